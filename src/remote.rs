//! `motif view --server URL --token T`: the viewer's generations run on a
//! `motif serve` instead of this machine. The job goes to `POST /api/v1/jobs`,
//! its live preview frames come from the event stream, and the finished clip
//! (animated WebP, which the `image` crate decodes into the viewer's frames)
//! and its recipe are saved into the outputs folder as a local run would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use image::AnimationDecoder;
use motif_engine::pipelines::{Event, ModelCache, Preview};
use motif_engine::Gpu;
use motif_recipe::OutputFormat;
use motif_server::JobRequest;
use motif_viewer::{Controls, ModelDefaults, Saved};
use serde_json::Value;

pub struct Remote {
    pub server: String,
    pub token: String,
    /// The defaults of the panel (the local model card's, when there is one).
    pub defaults: ModelDefaults,
    /// The server's job id of each clip saved here, for Publish.
    pub jobs: Mutex<HashMap<PathBuf, String>>,
}

impl Remote {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// The API's error text for a refused request.
    fn refused(e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::Status(status, r) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let field = body["field"]
                    .as_str()
                    .map(|f| format!("{f}: "))
                    .unwrap_or_default();
                anyhow!(
                    "the server refused it ({status}): {field}{}",
                    body["error"].as_str().unwrap_or("no reason given")
                )
            }
            e => anyhow!("cannot reach the server: {e}"),
        }
    }

    /// The job of a Generate: the panel's recipe for the server's own
    /// model, its clip as animated WebP, the stills base64.
    fn job(&self, c: &Controls) -> Result<Value> {
        let mut recipe = c.recipe();
        recipe.model = None;
        let base64 = |still: Option<String>| -> Result<Option<String>> {
            let Some(path) = still else { return Ok(None) };
            let bytes = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
            Ok(Some(
                base64::engine::general_purpose::STANDARD.encode(bytes),
            ))
        };
        let image = base64(recipe.image.take())?;
        let last_image = base64(recipe.last_image.take())?;
        let job = JobRequest {
            recipe,
            format: Some(OutputFormat::Webp),
            image,
            last_image,
        };
        Ok(job.body())
    }
}

/// A preview grid PNG (`data:` URL) back into frames: the server lays `n`
/// frames out in ceil(sqrt(n)) columns.
fn preview_frames(data_url: &str, n: usize) -> Option<Preview> {
    let b64 = data_url.strip_prefix("data:image/png;base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let grid = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .ok()?
        .to_rgb8();
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols.max(1));
    if n == 0 || cols == 0 {
        return None;
    }
    let (w, h) = (grid.width() as usize / cols, grid.height() as usize / rows);
    let frames = (0..n)
        .map(|i| {
            let (x0, y0) = ((i % cols) * w, (i / cols) * h);
            let mut f = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    f.extend_from_slice(&grid.get_pixel((x0 + x) as u32, (y0 + y) as u32).0);
                }
            }
            f
        })
        .collect();
    Some(Preview {
        width: w,
        height: h,
        frames,
    })
}

impl motif_viewer::Backend for Remote {
    fn defaults(&self, _model: &str) -> Result<ModelDefaults> {
        Ok(self.defaults)
    }

    fn can_publish(&self) -> bool {
        true
    }

    fn publish(&self, saved: &Saved) -> Result<String> {
        let id = self
            .jobs
            .lock()
            .ok()
            .and_then(|jobs| jobs.get(&saved.clip).cloned())
            .ok_or_else(|| anyhow!("{} was not made on this server", saved.clip.display()))?;
        let answer: Value = ureq::post(&self.url(&format!("/api/v1/jobs/{id}/publish")))
            .set("Authorization", &self.auth())
            .call()
            .map_err(Remote::refused)?
            .into_json()
            .context("the server's answer to publishing")?;
        let page = answer["page"]
            .as_str()
            .ok_or_else(|| anyhow!("the server's answer has no page: {answer}"))?;
        Ok(self.url(page))
    }

    fn generate(
        &self,
        _gpu: &Gpu,
        // The server loads and keeps its own models.
        _models: &mut ModelCache,
        c: &Controls,
        output: &Path,
        _say: &dyn Fn(&str),
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Option<Saved>> {
        let accepted: Value = ureq::post(&self.url("/api/v1/jobs"))
            .set("Authorization", &self.auth())
            .send_json(self.job(c)?)
            .map_err(Remote::refused)?
            .into_json()
            .context("the server's answer to the job")?;
        let id = accepted["id"]
            .as_str()
            .ok_or_else(|| anyhow!("the server's answer has no job id: {accepted}"))?
            .to_string();
        let stream = ureq::get(&self.url(&format!("/api/v1/jobs/{id}/events")))
            .set("Authorization", &self.auth())
            .timeout(Duration::from_secs(24 * 3600))
            .call()
            .map_err(Remote::refused)?;
        let mut event = String::new();
        let mut started = false;
        let mut done = Value::Null;
        for line in BufReader::new(stream.into_reader()).lines() {
            let line = line.context("reading the job's event stream")?;
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
                continue;
            }
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let data: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            let keep_going = match event.as_str() {
                "progress" => {
                    let total = data["total"].as_u64().unwrap_or(0) as usize;
                    let step = data["step"].as_u64().unwrap_or(0) as usize;
                    let mut go = true;
                    if !started {
                        started = true;
                        go = events(Event::Started { steps: total });
                    }
                    if step > 0 {
                        let preview = data["preview"]
                            .as_str()
                            .and_then(|p| preview_frames(p, c.frames));
                        go &= events(Event::Step {
                            index: step - 1,
                            total,
                            timestep: 0.0,
                            preview: preview.as_ref(),
                            // Frames from the server arrive as PNG, not on this GPU.
                            gpu_preview: None,
                        });
                    }
                    go
                }
                "done" => {
                    done = data;
                    break;
                }
                _ => true,
            };
            if !keep_going {
                // Cancel on the server; the stream ends with its `done`.
                ureq::post(&self.url(&format!("/api/v1/jobs/{id}/cancel")))
                    .set("Authorization", &self.auth())
                    .call()
                    .map_err(Remote::refused)?;
            }
        }
        match done["state"].as_str() {
            Some("finished") => {}
            Some("cancelled") => return Ok(None),
            Some(state) => bail!(
                "the job {state} on the server: {}",
                done["error"].as_str().unwrap_or("no error given")
            ),
            None => bail!("the server closed the event stream before the job ended"),
        }
        let download = |path: &str| -> Result<Vec<u8>> {
            let mut bytes = Vec::new();
            ureq::get(&self.url(path))
                .set("Authorization", &self.auth())
                .call()
                .map_err(Remote::refused)?
                .into_reader()
                .take(1 << 30)
                .read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        let clip_bytes = download(&format!("/api/v1/jobs/{id}/clip"))?;
        let recipe_bytes = download(&format!("/api/v1/jobs/{id}/recipe"))?;
        let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(&clip_bytes))
            .context("the server's clip is not a WebP")?;
        let frames = decoder
            .into_frames()
            .collect_frames()
            .context("decoding the server's clip")?;
        let first = frames
            .first()
            .ok_or_else(|| anyhow!("the server's clip has no frames"))?;
        let (width, height) = first.buffer().dimensions();
        let rgb = frames
            .iter()
            .map(|f| {
                f.buffer()
                    .pixels()
                    .flat_map(|p| [p.0[0], p.0[1], p.0[2]])
                    .collect()
            })
            .collect();
        let clip = output.with_extension("webp");
        let recipe = output.with_extension("json");
        if let Some(dir) = clip.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&clip, &clip_bytes)
            .with_context(|| format!("writing {}", clip.display()))?;
        std::fs::write(&recipe, &recipe_bytes)
            .with_context(|| format!("writing {}", recipe.display()))?;
        eprintln!("motif view: job {id} on {}", self.server);
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(clip.clone(), id);
        }
        Ok(Some(Saved {
            clip,
            recipe,
            width: width as usize,
            height: height as usize,
            fps: c.fps,
            frames: rgb,
        }))
    }
}
