//! What the window shows and does: the controls panel, the clip view (the
//! x0 previews while denoising, then the decoded clip looping), the frame
//! grid, progress, export and the gallery strip. No winit here; of wgpu
//! only the preview textures, which [`NativeTextures`] hands to egui.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use egui::{Color32, ColorImage, Rect, TextureHandle, TextureId, TextureOptions, Vec2};
use motif_engine::pipelines::request::{DEFAULT_MOTION, DEFAULT_STRENGTH};
use motif_engine::pipelines::FrameTextures;
use motif_recipe::{CameraMove, Recipe, Scheduler};

use crate::worker::{Job, Update, Worker};
use crate::{Backend, Controls, ImageUse, ModelChoice, ModelDefaults, Options, Saved, Script};

/// The aspect buttons: width:height.
const ASPECTS: [(usize, usize); 4] = [(16, 9), (9, 16), (1, 1), (4, 5)];

/// Textures that live on the GPU, drawn by egui's renderer without a copy
/// (the window implements it with egui-wgpu's native textures).
pub trait NativeTextures {
    /// Makes `view` drawable; it is sampled with linear filtering.
    fn register(&mut self, view: &motif_engine::wgpu::TextureView) -> TextureId;
    fn free(&mut self, id: TextureId);
}

/// Frames on screen: the previews (latent size) or the decoded clip.
struct Frames {
    ids: Vec<TextureId>,
    width: usize,
    height: usize,
    source: FrameSource,
}

enum FrameSource {
    /// Decoded frames uploaded to egui, which frees them with the handles
    /// (kept only to keep the textures alive).
    Uploaded { _handles: Vec<TextureHandle> },
    /// The engine's preview textures (their [`FrameTextures::id`]),
    /// registered with the renderer: the engine rewrites them every step.
    Native(u64),
}

impl Frames {
    fn upload(ctx: &egui::Context, name: &str, w: usize, h: usize, rgb: &[Vec<u8>]) -> Self {
        let handles: Vec<TextureHandle> = rgb
            .iter()
            .enumerate()
            .map(|(i, f)| {
                ctx.load_texture(
                    format!("{name}-{i}"),
                    ColorImage::from_rgb([w, h], f),
                    TextureOptions::LINEAR,
                )
            })
            .collect();
        Frames {
            ids: handles.iter().map(|t| t.id()).collect(),
            width: w,
            height: h,
            source: FrameSource::Uploaded { _handles: handles },
        }
    }

    fn native(textures: &FrameTextures, native: &mut dyn NativeTextures) -> Self {
        Frames {
            ids: textures.views.iter().map(|v| native.register(v)).collect(),
            width: textures.width,
            height: textures.height,
            source: FrameSource::Native(textures.id),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Loading,
    Denoising,
    Decoding,
}

struct Run {
    cancel: Arc<AtomicBool>,
    resume: Option<Sender<()>>,
    phase: Phase,
    step: usize,
    total: usize,
    decoded: usize,
    frames: usize,
    started: Instant,
    denoise_start: Option<Instant>,
    last_step_at: Option<Instant>,
    cancelling: bool,
    /// The backend's last status line (`model loaded: …`).
    note: Option<String>,
}

struct Playback {
    playing: bool,
    frame: usize,
    fps: f32,
    /// When frame 0 was (or would have been) shown, for looping by the clock.
    t0: f64,
}

/// A past clip in the outputs folder.
struct GalleryItem {
    recipe: PathBuf,
    clip: PathBuf,
    prompt: String,
    /// All frames stacked vertically (written by the viewer beside its clips).
    sheet: Option<PathBuf>,
    thumb: Option<TextureHandle>,
}

enum Message {
    Info(String),
    Error(String),
}

/// The two still slots of the panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The still to animate (the first frame).
    Image,
    /// The still the clip ends on (first-last frame).
    LastImage,
}

impl Slot {
    fn title(self) -> &'static str {
        match self {
            Slot::Image => "Image to animate",
            Slot::LastImage => "Last frame",
        }
    }
}

pub struct Viewer {
    pub controls: Controls,
    defaults: ModelDefaults,
    styles: Vec<String>,
    models: Vec<ModelChoice>,
    outputs: PathBuf,
    script: Script,
    backend: Arc<dyn Backend>,
    updates: Receiver<Update>,
    run: Option<Run>,
    frames: Option<Frames>,
    /// Native textures no longer shown, freed at the start of the next frame.
    retired: Vec<TextureId>,
    /// Scripted generations finished so far (of `script.repeat`).
    runs_done: usize,
    /// The open file dialog's answer and the slot it is for, when one is open.
    picking: Option<(Slot, Receiver<Option<PathBuf>>)>,
    /// Where the last-image slot was drawn in the last frame: a file
    /// dropped there is the last image, anywhere else the first.
    last_slot_rect: Option<Rect>,
    playback: Playback,
    /// The last clip written or replayed, for export.
    current: Option<Saved>,
    message: Option<Message>,
    gallery: Vec<GalleryItem>,
    /// Where the clip view was drawn in the last frame, in points.
    pub clip_rect: Option<Rect>,
    /// A screenshot to take of the frame being drawn.
    pub want_screenshot: bool,
    screenshot_taken: bool,
    /// Resume the paused worker once the screenshot is saved.
    resume_after_screenshot: bool,
    /// Cancel the run once the screenshot is saved (a step screenshot ends it).
    stop_after_screenshot: bool,
    /// Exit with this code (after any pending screenshot).
    pub exit: Option<i32>,
    started_script: bool,
    /// Last, so that it drops after `run`: dropping it waits for the
    /// generation thread, which a paused run's resume channel (in `run`)
    /// must not keep waiting.
    worker: Worker,
}

impl Viewer {
    pub fn new(
        options: Options,
        backend: Arc<dyn Backend>,
        worker: Worker,
        updates: Receiver<Update>,
    ) -> Self {
        let defaults = backend
            .defaults(&options.controls.model)
            .unwrap_or(ModelDefaults {
                width: options.controls.width,
                height: options.controls.height,
                frames: options.controls.frames,
                steps: options.controls.steps,
                guidance: options.controls.guidance,
                fps: options.controls.fps,
                ..ModelDefaults::ANIMATEDIFF
            });
        let mut v = Viewer {
            playback: Playback {
                playing: false,
                frame: 0,
                fps: options.controls.fps,
                t0: 0.0,
            },
            controls: options.controls,
            defaults,
            styles: options.styles,
            models: options.models,
            outputs: options.outputs,
            script: options.script,
            backend,
            worker,
            updates,
            run: None,
            frames: None,
            retired: Vec::new(),
            runs_done: 0,
            picking: None,
            last_slot_rect: None,
            current: None,
            message: None,
            gallery: Vec::new(),
            clip_rect: None,
            want_screenshot: false,
            screenshot_taken: false,
            resume_after_screenshot: false,
            stop_after_screenshot: false,
            exit: None,
            started_script: false,
        };
        v.scan_gallery();
        v
    }

    pub fn script(&self) -> &Script {
        &self.script
    }

    /// One frame of the UI.
    pub fn show(&mut self, ui: &mut egui::Ui, native: &mut dyn NativeTextures) {
        let ctx = ui.ctx().clone();
        for id in self.retired.drain(..) {
            native.free(id);
        }
        self.take_updates(&ctx, native);
        self.take_dropped_files(&ctx);
        self.take_picked_file(&ctx);
        if self.script.active() && !self.started_script {
            self.started_script = true;
            // What the panel offers for this model, for tests and docs.
            let on = |b: bool| if b { "on" } else { "off" };
            let (image, last) = self.slots_enabled();
            println!("takes: {}", self.defaults.takes.describe());
            println!("slots: image {}, last image {}", on(image), on(last));
            if self.script.auto_generate {
                self.generate();
            } else {
                self.want_screenshot = true;
                self.exit = Some(0);
            }
        }

        egui::Panel::left("controls")
            .resizable(false)
            .exact_size(300.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.controls_panel(ui));
            });
        egui::Panel::bottom("gallery")
            .exact_size(110.0)
            .show(ui, |ui| self.gallery_strip(ui));
        egui::CentralPanel::default_margins().show(ui, |ui| self.clip_panel(ui));

        if self.playback.playing {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_secs_f32(
                    0.5 / self.playback.fps.max(1.0),
                ));
        }
    }

    /// Shows `frames` instead of what is shown.
    fn set_frames(&mut self, frames: Frames) {
        if let Some(old) = self.frames.replace(frames) {
            if let FrameSource::Native(_) = old.source {
                self.retired.extend(old.ids);
            }
        }
    }

    fn take_updates(&mut self, ctx: &egui::Context, native: &mut dyn NativeTextures) {
        while let Ok(update) = self.updates.try_recv() {
            let Some(run) = self.run.as_mut() else {
                continue;
            };
            match update {
                Update::Started { steps, at } => {
                    run.phase = Phase::Denoising;
                    run.total = steps;
                    run.denoise_start = Some(at);
                }
                Update::Step {
                    step,
                    total,
                    preview,
                    at,
                } => {
                    run.step = step;
                    run.total = total;
                    run.last_step_at = Some(at);
                    if let Some(p) = preview {
                        // The engine rewrote the textures in place; new ones
                        // (a new run) are registered once.
                        let shown = match &self.frames {
                            Some(f) => matches!(f.source, FrameSource::Native(id) if id == p.id),
                            None => false,
                        };
                        if !shown {
                            self.set_frames(Frames::native(&p, native));
                        }
                        if self.script.active() {
                            // Scripted screenshots show a fixed frame: the last.
                            self.playback.frame = p.frames().saturating_sub(1);
                        }
                    }
                    self.on_step(step);
                    // Stop here, and no later: the remaining updates are for after the screenshot.
                    if self.want_screenshot {
                        return;
                    }
                }
                Update::Decoded { frame, total } => {
                    run.phase = Phase::Decoding;
                    run.decoded = frame + 1;
                    run.frames = total;
                }
                Update::Note(line) => {
                    if self.script.active() {
                        println!("{line}");
                    }
                    run.note = Some(line);
                }
                Update::Finished(saved) => {
                    self.run = None;
                    self.finished(ctx, saved);
                }
                Update::Cancelled { after_step } => {
                    self.run = None;
                    self.message = Some(Message::Info(format!(
                        "cancelled after step {after_step}: nothing saved"
                    )));
                    if self.script.active() {
                        println!("cancelled after step {after_step}");
                        self.script_done(0);
                    }
                }
                Update::Failed(e) => {
                    self.run = None;
                    self.message = Some(Message::Error(e.clone()));
                    if self.script.active() {
                        eprintln!("error: {e}");
                        self.script_done(1);
                    }
                }
            }
        }
    }

    /// Scripted actions at a step (the worker waits until resumed).
    fn on_step(&mut self, step: usize) {
        let pause = self.pause_step();
        if pause != Some(step) {
            return;
        }
        if self.script.cancel_at_step == Some(step) {
            self.cancel();
        }
        if self.script.screenshot_at_step == Some(step) && self.script.screenshot.is_some() {
            self.want_screenshot = true;
            self.resume_after_screenshot = true;
            if self.script.cancel_at_step != Some(step) {
                // The screenshot was the point of this run: stop it and exit.
                self.stop_after_screenshot = true;
                self.exit = Some(0);
            }
        } else {
            self.resume();
        }
    }

    fn pause_step(&self) -> Option<usize> {
        let shot = self
            .script
            .screenshot_at_step
            .filter(|_| self.script.screenshot.is_some());
        match (shot, self.script.cancel_at_step) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn resume(&mut self) {
        if let Some(run) = &mut self.run {
            if let Some(tx) = run.resume.take() {
                let _ = tx.send(());
            }
        }
    }

    /// Scripted: take the final screenshot (if asked and not taken), then exit.
    fn script_done(&mut self, code: i32) {
        if self.script.screenshot.is_some() && !self.screenshot_taken {
            self.want_screenshot = true;
        }
        self.exit = Some(code);
    }

    /// Called by the window once the screenshot of this frame is saved.
    pub fn screenshot_saved(&mut self) {
        self.screenshot_taken = true;
        self.want_screenshot = false;
        if self.stop_after_screenshot {
            self.cancel();
        }
        if self.resume_after_screenshot {
            self.resume_after_screenshot = false;
            self.resume();
        }
    }

    fn finished(&mut self, ctx: &egui::Context, saved: Saved) {
        self.set_frames(Frames::upload(
            ctx,
            "clip",
            saved.width,
            saved.height,
            &saved.frames,
        ));
        self.playback = Playback {
            playing: !self.script.active(),
            frame: saved.frames.len().saturating_sub(1),
            fps: saved.fps,
            t0: ctx.input(|i| i.time),
        };
        if let Err(e) = write_sheet(&saved) {
            self.message = Some(Message::Error(format!("writing the gallery sheet: {e:#}")));
        } else {
            self.message = Some(Message::Info(format!("saved {}", saved.clip.display())));
        }
        if self.script.active() {
            println!("clip: {}", saved.clip.display());
            println!("recipe: {}", saved.recipe.display());
        }
        if self.script.publish {
            self.publish(&saved);
            if let Some(Message::Error(e)) = &self.message {
                eprintln!("publish: {e}");
                self.current = Some(saved);
                self.script_done(1);
                return;
            }
        }
        self.current = Some(saved);
        self.scan_gallery();
        if self.script.active() {
            self.runs_done += 1;
            if self.runs_done < self.script.repeat {
                self.generate();
            } else {
                self.script_done(0);
            }
        }
    }

    fn generate(&mut self) {
        if self.run.is_some() {
            return;
        }
        if self.controls.prompt.trim().is_empty() {
            self.message = Some(Message::Error("type a prompt first".into()));
            if self.script.active() {
                eprintln!("error: no prompt");
                self.script_done(1);
            }
            return;
        }
        if !self.controls.seed_locked {
            self.controls.seed = rand::random::<u32>() as u64;
        }
        if let Err(e) = std::fs::create_dir_all(&self.outputs) {
            self.message = Some(Message::Error(format!(
                "cannot create the outputs folder {}: {e}",
                self.outputs.display()
            )));
            return;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Two Generates within a second with a locked seed get distinct names.
        let name = format!("motif-{stamp}-{}", self.controls.seed);
        let output = (1..)
            .map(|n| match n {
                1 => self.outputs.join(format!("{name}.mp4")),
                n => self.outputs.join(format!("{name}-{n}.mp4")),
            })
            .find(|p| !p.exists())
            .expect("some numbered name is free");
        let cancel = Arc::new(AtomicBool::new(false));
        let (resume_tx, resume_rx) = channel();
        let pause = self.pause_step();
        let job = Job {
            controls: self.controls.clone(),
            output,
            cancel: cancel.clone(),
            pause_after_step: pause,
            resume: pause.map(|_| resume_rx),
        };
        if !self.worker.submit(job) {
            self.message = Some(Message::Error("the generation thread has stopped".into()));
            return;
        }
        self.message = None;
        self.run = Some(Run {
            cancel,
            resume: pause.map(|_| resume_tx),
            phase: Phase::Loading,
            step: 0,
            total: self.controls.steps,
            decoded: 0,
            frames: self.controls.frames,
            started: Instant::now(),
            denoise_start: None,
            last_step_at: None,
            cancelling: false,
            note: None,
        });
    }

    fn cancel(&mut self) {
        if let Some(run) = &mut self.run {
            run.cancel.store(true, Ordering::SeqCst);
            run.cancelling = true;
        }
    }

    fn take_dropped_files(&mut self, ctx: &egui::Context) {
        let (dropped, at): (Vec<PathBuf>, _) = ctx.input(|i| {
            let files = (i.raw.dropped_files.iter())
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect();
            (files, i.pointer.hover_pos())
        });
        let on_last = matches!((self.last_slot_rect, at), (Some(r), Some(p)) if r.contains(p));
        let slot = if on_last && self.defaults.takes.last_image {
            Slot::LastImage
        } else {
            Slot::Image
        };
        for path in dropped {
            self.set_still(slot, path);
        }
    }

    /// Opens the system's file dialog on its own thread (it blocks until
    /// the user answers; the window keeps drawing).
    fn open_file_dialog(&mut self, slot: Slot) {
        if let Some(why) = file_dialog_unavailable(&dialog_env()) {
            self.message = Some(Message::Error(why));
            return;
        }
        let (tx, rx) = channel();
        let spawned = std::thread::Builder::new()
            .name("motif-file-dialog".into())
            .spawn(move || {
                let picked = rfd::FileDialog::new()
                    .set_title(slot.title())
                    .add_filter("image", &["png", "jpg", "jpeg", "webp"])
                    .pick_file();
                let _ = tx.send(picked);
            });
        match spawned {
            Ok(_) => self.picking = Some((slot, rx)),
            Err(e) => {
                self.message = Some(Message::Error(format!("cannot open a file dialog: {e}")))
            }
        }
    }

    fn take_picked_file(&mut self, ctx: &egui::Context) {
        let Some((slot, rx)) = &self.picking else {
            return;
        };
        let slot = *slot;
        match rx.try_recv() {
            Ok(Some(path)) => {
                self.picking = None;
                self.set_still(slot, path);
            }
            Ok(None) => {
                self.picking = None;
                self.message = Some(Message::Info(
                    "no file chosen (if no dialog appeared, this desktop offers no file \
                     chooser: drop the image on the window or type its path)"
                        .into(),
                ));
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                ctx.request_repaint_after(std::time::Duration::from_millis(100));
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.picking = None;
                self.message = Some(Message::Error("the file dialog failed".into()));
            }
        }
    }

    fn set_still(&mut self, slot: Slot, path: PathBuf) {
        match image::ImageReader::open(&path).and_then(|r| r.with_guessed_format()) {
            Ok(r) if r.format().is_some() => {
                let (name, field) = match slot {
                    Slot::Image => ("image", &mut self.controls.image),
                    Slot::LastImage => ("last image", &mut self.controls.last_image),
                };
                self.message = Some(Message::Info(format!("{name}: {}", path.display())));
                *field = Some(path);
            }
            _ => {
                self.message = Some(Message::Error(format!(
                    "{} is not an image (PNG, JPEG or WebP expected)",
                    path.display()
                )))
            }
        }
    }

    fn set_model(&mut self, model: String) {
        match self.backend.defaults(&model) {
            Ok(d) => {
                self.defaults = d;
                let c = &mut self.controls;
                (c.width, c.height, c.frames, c.steps, c.guidance, c.fps) =
                    (d.width, d.height, d.frames, d.steps, d.guidance, d.fps);
                // A native image-to-video model has no strength: the slider
                // goes back to the value every family runs as its default.
                if d.takes.image == ImageUse::Native {
                    c.strength = DEFAULT_STRENGTH;
                }
            }
            Err(e) => self.message = Some(Message::Error(format!("{e:#}"))),
        }
        self.controls.model = model;
    }

    /// One still slot: a path, Open…, clear; the first one's strength
    /// when the model anchors it.
    fn still_slot(&mut self, ui: &mut egui::Ui, slot: Slot) {
        let hint = match slot {
            Slot::Image => "(open one, or drop a file on the window)",
            Slot::LastImage => "(open one, or drop a file here)",
        };
        ui.label(format!("{} {hint}", slot.title()));
        let still = match slot {
            Slot::Image => &self.controls.image,
            Slot::LastImage => &self.controls.last_image,
        };
        let mut text = (still.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let set = still.is_some();
        ui.horizontal(|ui| {
            let edit = ui.add(
                egui::TextEdit::singleline(&mut text)
                    .desired_width(220.0)
                    .hint_text("none"),
            );
            if edit.lost_focus() && !text.trim().is_empty() {
                self.set_still(slot, PathBuf::from(text.trim()));
            }
            if ui
                .add_enabled(self.picking.is_none(), egui::Button::new("Open…"))
                .clicked()
            {
                self.open_file_dialog(slot);
            }
            if set && ui.button("clear").clicked() {
                match slot {
                    Slot::Image => self.controls.image = None,
                    Slot::LastImage => self.controls.last_image = None,
                }
            }
        });
        let anchors = self.defaults.takes.image != ImageUse::Native;
        if slot == Slot::Image && self.controls.image.is_some() && anchors {
            ui.add(egui::Slider::new(&mut self.controls.strength, 0.05..=1.0).text("strength"));
        }
    }

    /// Whether the image and the last-image slots can be used.
    fn slots_enabled(&self) -> (bool, bool) {
        let takes = self.defaults.takes;
        (
            takes.image != ImageUse::None || self.controls.image.is_some(),
            takes.last_image || self.controls.last_image.is_some(),
        )
    }

    /// Both still slots, each greyed out with the reason when the model
    /// does not take it (but kept usable while it holds a still, from a
    /// remix, so that it can be cleared).
    fn still_slots(&mut self, ui: &mut egui::Ui) {
        let takes = self.defaults.takes;
        let family = self.defaults.family_name();
        let (takes_image, takes_last) = self.slots_enabled();
        ui.add_enabled_ui(takes_image, |ui| self.still_slot(ui, Slot::Image))
            .response
            .on_disabled_hover_text(format!(
                "{family}: this model makes clips from the prompt only (no still)"
            ));
        let last = ui.add_enabled_ui(takes_last, |ui| self.still_slot(ui, Slot::LastImage));
        self.last_slot_rect = Some(last.response.rect);
        if !takes.last_image {
            ui.weak("Last frame: only a first-last-frame model (Wan2.1-FLF2V) takes one")
                .on_hover_text(format!(
                    "{family}: this model does not end the clip on a given frame"
                ));
        }
    }

    fn controls_panel(&mut self, ui: &mut egui::Ui) {
        let busy = self.run.is_some();
        ui.heading("Motif");
        ui.label("Prompt");
        ui.add(
            egui::TextEdit::multiline(&mut self.controls.prompt)
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text("a red ball bouncing on grass"),
        );
        ui.label("Negative prompt");
        ui.add(
            egui::TextEdit::singleline(&mut self.controls.negative)
                .desired_width(f32::INFINITY)
                .hint_text("(the style's)"),
        );
        let c = &mut self.controls;
        let d = self.defaults;
        egui::Grid::new("picks").num_columns(2).show(ui, |ui| {
            ui.label("Style");
            egui::ComboBox::from_id_salt("style")
                .selected_text(c.style.as_deref().unwrap_or("none"))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut c.style, None, "none");
                    for s in &self.styles {
                        ui.selectable_value(&mut c.style, Some(s.clone()), s);
                    }
                });
            ui.end_row();
            // A family without a control greys it out, unless it holds a
            // value (a remix) that must be set back to run: the engine then
            // refuses it by name, shown below.
            let family = d.family_name();
            ui.label("Camera");
            ui.add_enabled_ui(d.camera || c.camera.is_some(), |ui| {
                egui::ComboBox::from_id_salt("camera")
                    .selected_text(c.camera.map_or("none", |m| m.name()))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut c.camera, None, "none");
                        for &m in CameraMove::ALL {
                            ui.selectable_value(&mut c.camera, Some(m), m.name());
                        }
                    });
            })
            .response
            .on_disabled_hover_text(format!("{family} takes no camera move"));
            ui.end_row();
            ui.label("Motion");
            ui.add_enabled(
                d.motion || c.motion != DEFAULT_MOTION,
                egui::Slider::new(&mut c.motion, 0.0..=4.0).step_by(0.25),
            )
            .on_disabled_hover_text(format!("{family} has no motion setting"));
            ui.end_row();
        });
        ui.separator();
        ui.horizontal(|ui| {
            ui.label("Aspect");
            let area = (d.width * d.height) as f64;
            for (a, b) in ASPECTS {
                let w = d.snap_size((area * a as f64 / b as f64).sqrt());
                let h = d.snap_size(w as f64 * b as f64 / a as f64);
                if ui
                    .selectable_label((c.width, c.height) == (w, h), format!("{a}:{b}"))
                    .clicked()
                {
                    (c.width, c.height) = (w, h);
                }
            }
        });
        egui::Grid::new("numbers").num_columns(2).show(ui, |ui| {
            ui.label("Size");
            ui.horizontal(|ui| {
                let m = d.size_multiple;
                ui.add(
                    egui::DragValue::new(&mut c.width)
                        .range(m..=2048)
                        .speed(m as f64),
                );
                ui.label("×");
                ui.add(
                    egui::DragValue::new(&mut c.height)
                        .range(m..=2048)
                        .speed(m as f64),
                );
            });
            // The VAE works in blocks of 8 pixels (Wan's transformer in
            // patches of 2 latent pixels on top).
            c.width = d.snap_size(c.width as f64);
            c.height = d.snap_size(c.height as f64);
            ui.end_row();
            ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut c.seed));
                ui.checkbox(&mut c.seed_locked, "lock")
                    .on_hover_text("unlocked: every Generate draws a new seed");
                if ui.button("re-roll").clicked() {
                    c.seed = rand::random::<u32>() as u64;
                    c.seed_locked = true;
                }
            });
            ui.end_row();
            ui.label("Steps");
            ui.add(egui::DragValue::new(&mut c.steps).range(1..=150));
            ui.end_row();
            ui.label("Guidance");
            ui.add(
                egui::DragValue::new(&mut c.guidance)
                    .range(0.0..=30.0)
                    .speed(0.1),
            );
            ui.end_row();
            ui.label("Frames");
            // A drag moves by whole steps, so snapping never holds it back.
            ui.add(
                egui::DragValue::new(&mut c.frames)
                    .range(1..=257)
                    .speed(d.frame_step as f64),
            );
            // Wan's VAE is causal in time: 1 + 4k frames.
            c.frames = d.snap_frames(c.frames);
            ui.end_row();
            ui.label("FPS");
            ui.add(
                egui::DragValue::new(&mut c.fps)
                    .range(1.0..=60.0)
                    .speed(0.5),
            );
            ui.end_row();
            ui.label("Scheduler");
            egui::ComboBox::from_id_salt("scheduler")
                .selected_text(c.scheduler.map_or("model's", |s| s.name()))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut c.scheduler, None, "model's");
                    for &s in Scheduler::ALL {
                        ui.selectable_value(&mut c.scheduler, Some(s), s.name());
                    }
                });
            ui.end_row();
        });
        ui.separator();
        let mut new_model = None;
        ui.horizontal(|ui| {
            ui.label("Model");
            let current = self
                .models
                .iter()
                .find(|m| m.path == self.controls.model || m.name == self.controls.model)
                .map_or(self.controls.model.clone(), |m| m.name.clone());
            egui::ComboBox::from_id_salt("model")
                .selected_text(current)
                .width(200.0)
                .show_ui(ui, |ui| {
                    for m in &self.models {
                        let label = match &m.takes {
                            Some(t) => format!("{}  —  {}", m.name, t.describe()),
                            None => m.name.clone(),
                        };
                        if ui
                            .selectable_label(m.path == self.controls.model, label)
                            .on_hover_text(&m.path)
                            .clicked()
                        {
                            new_model = Some(m.path.clone());
                        }
                    }
                })
                .response
                .on_hover_text(format!("family: {}", self.defaults.family_name()));
        });
        if let Some(m) = new_model {
            self.set_model(m);
        }
        ui.label(format!("Takes: {}", self.defaults.takes.describe()));
        self.still_slots(ui);
        ui.separator();
        ui.horizontal(|ui| {
            let generate = ui.add_enabled(!busy, egui::Button::new("Generate"));
            if generate.clicked() {
                self.generate();
            }
            let cancelling = self.run.as_ref().is_some_and(|r| r.cancelling);
            if ui
                .add_enabled(busy && !cancelling, egui::Button::new("Cancel"))
                .clicked()
            {
                self.cancel();
            }
        });
        match &self.message {
            Some(Message::Info(m)) => {
                ui.label(m);
            }
            Some(Message::Error(m)) => {
                ui.colored_label(Color32::from_rgb(255, 110, 100), m);
            }
            None => {}
        }
    }

    /// The progress row; always there, so the clip view does not move.
    fn progress(&self, ui: &mut egui::Ui) {
        let Some(run) = &self.run else {
            let text = match &self.current {
                Some(c) => {
                    format!("done · seed {}", self.controls.seed)
                        + &format!(" · {} frames of {}x{}", c.frames.len(), c.width, c.height)
                }
                None => "ready".to_string(),
            };
            ui.add(
                egui::ProgressBar::new(if self.current.is_some() { 1.0 } else { 0.0 }).text(text),
            );
            return;
        };
        let (fraction, text) = match run.phase {
            Phase::Loading => (
                0.0,
                match &run.note {
                    Some(note) if note.starts_with("model") => {
                        format!("{note} · encoding the prompt…")
                    }
                    _ => format!(
                        "loading the model… {:.1} s",
                        run.started.elapsed().as_secs_f32()
                    ),
                },
            ),
            Phase::Denoising => {
                let mut text = format!("step {}/{}", run.step, run.total);
                if let (Some(t0), Some(t1)) = (run.denoise_start, run.last_step_at) {
                    let secs = (t1 - t0).as_secs_f64();
                    if run.step > 0 && secs > 0.0 {
                        let rate = run.step as f64 / secs;
                        let eta = (run.total - run.step) as f64 / rate;
                        text += &format!("  {rate:.2} it/s  ETA {eta:.0} s");
                    }
                }
                (run.step as f32 / run.total.max(1) as f32, text)
            }
            Phase::Decoding => (
                1.0,
                format!("decoding frame {}/{}", run.decoded, run.frames),
            ),
        };
        let text = if run.cancelling {
            format!("{text}  (cancelling…)")
        } else {
            text
        };
        ui.add(egui::ProgressBar::new(fraction).text(text));
        // While working, keep the clocks moving even without updates.
        ui.ctx()
            .request_repaint_after(std::time::Duration::from_millis(250));
    }

    fn clip_panel(&mut self, ui: &mut egui::Ui) {
        self.progress(ui);
        self.clip_rect = None;
        let Some(frames) = &self.frames else {
            ui.centered_and_justified(|ui| {
                ui.label("Type a prompt and press Generate: every frame shows here as it forms.");
            });
            return;
        };
        let n = frames.ids.len();
        if self.playback.playing && n > 0 {
            let t = ui.input(|i| i.time) - self.playback.t0;
            self.playback.frame = ((t * self.playback.fps as f64) as usize) % n;
        }
        self.playback.frame = self.playback.frame.min(n.saturating_sub(1));
        // The clip view: as large as fits above the grid, aspect kept.
        let avail = ui.available_size();
        let aspect = frames.width as f32 / frames.height as f32;
        let grid_h = 90.0;
        let max = Vec2::new(avail.x, (avail.y - grid_h - 40.0).max(64.0));
        let size = if max.x / max.y > aspect {
            Vec2::new(max.y * aspect, max.y)
        } else {
            Vec2::new(max.x, max.x / aspect)
        };
        let size = size.floor();
        ui.vertical_centered(|ui| {
            let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
            if let Some(&id) = frames.ids.get(self.playback.frame) {
                ui.painter().image(
                    id,
                    rect,
                    Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                    Color32::WHITE,
                );
            }
            self.clip_rect = Some(rect);
        });
        // Playback controls.
        let mut restart = false;
        ui.horizontal(|ui| {
            let label = if self.playback.playing {
                "pause"
            } else {
                "play"
            };
            if ui.button(label).clicked() {
                self.playback.playing = !self.playback.playing;
                restart = true;
            }
            let mut frame = self.playback.frame;
            if ui
                .add(egui::Slider::new(&mut frame, 0..=n.saturating_sub(1)).text("frame"))
                .changed()
            {
                self.playback.frame = frame;
                self.playback.playing = false;
            }
            if ui
                .add(
                    egui::DragValue::new(&mut self.playback.fps)
                        .range(1.0..=60.0)
                        .suffix(" fps"),
                )
                .changed()
            {
                restart = true;
            }
            if let Some(saved) = self.current.clone() {
                ui.separator();
                ui.label("Export");
                for ext in ["gif", "webp"] {
                    if ui.button(ext).clicked() {
                        self.export(&saved, ext);
                    }
                }
                if self.backend.can_publish() && ui.button("Publish").clicked() {
                    self.publish(&saved);
                }
            }
        });
        if restart {
            // Keep the current frame when the clock restarts.
            let now = ui.input(|i| i.time);
            self.playback.t0 = now - self.playback.frame as f64 / self.playback.fps as f64;
        }
        // Every frame, small.
        let Some(frames) = &self.frames else {
            return;
        };
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal(|ui| {
                let h = grid_h - 10.0;
                let w = h * aspect;
                for (i, &id) in frames.ids.iter().enumerate() {
                    let (rect, resp) =
                        ui.allocate_exact_size(Vec2::new(w, h), egui::Sense::click());
                    ui.painter().image(
                        id,
                        rect,
                        Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                        Color32::WHITE,
                    );
                    if i == self.playback.frame {
                        ui.painter().rect_stroke(
                            rect,
                            0.0,
                            egui::Stroke::new(2.0, Color32::YELLOW),
                            egui::StrokeKind::Inside,
                        );
                    }
                    if resp.clicked() {
                        self.playback.frame = i;
                        self.playback.playing = false;
                    }
                }
            });
        });
    }

    /// Shows the clip in the server's gallery (a short request: on this thread).
    fn publish(&mut self, saved: &Saved) {
        self.message = Some(match self.backend.publish(saved) {
            Ok(page) => {
                if self.script.active() {
                    println!("published: {page}");
                }
                Message::Info(format!("published: {page}"))
            }
            Err(e) => Message::Error(format!("publishing: {e:#}")),
        });
    }

    fn export(&mut self, saved: &Saved, ext: &str) {
        let out = saved.clip.with_extension(ext);
        let recipe = std::fs::read_to_string(&saved.recipe).unwrap_or_default();
        let clip = motif_video::Clip {
            width: saved.width as u32,
            height: saved.height as u32,
            fps: self.playback.fps,
            frames: saved.frames.clone(),
        };
        self.message = Some(match motif_video::write_clip(&out, &clip, &recipe) {
            Ok(()) => Message::Info(format!("exported {}", out.display())),
            Err(e) => Message::Error(format!("exporting {}: {e}", out.display())),
        });
    }

    /// Reads the outputs folder: every recipe sidecar, newest first.
    fn scan_gallery(&mut self) {
        let mut items = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.outputs) {
            let mut recipes: Vec<(std::time::SystemTime, PathBuf)> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .map(|p| {
                    let t = std::fs::metadata(&p)
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (t, p)
                })
                .collect();
            recipes.sort_by_key(|r| std::cmp::Reverse(r.0));
            for (_, recipe) in recipes.into_iter().take(50) {
                let Some(made) = read_recipe(&recipe) else {
                    continue;
                };
                let clip = ["mp4", "gif", "webp"]
                    .iter()
                    .map(|e| recipe.with_extension(e))
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| recipe.with_extension("mp4"));
                let sheet = sheet_path(&clip);
                // Keep textures already made.
                let thumb = self
                    .gallery
                    .iter()
                    .find(|g| g.recipe == recipe)
                    .and_then(|g| g.thumb.clone());
                items.push(GalleryItem {
                    prompt: made.prompt.unwrap_or_default(),
                    sheet: sheet.is_file().then_some(sheet),
                    recipe,
                    clip,
                    thumb,
                });
            }
        }
        self.gallery = items;
    }

    fn gallery_strip(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.label(format!("Gallery · {}", self.outputs.display()));
            if ui.small_button("rescan").clicked() {
                self.scan_gallery();
            }
        });
        let mut replay = None;
        let mut remix = None;
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal(|ui| {
                for (i, item) in self.gallery.iter_mut().enumerate() {
                    ui.vertical(|ui| {
                        ui.set_width(72.0);
                        if item.thumb.is_none() {
                            item.thumb =
                                item.sheet.as_deref().and_then(|s| read_sheet(s).ok()).map(
                                    |(w, h, frames)| {
                                        ui.ctx().load_texture(
                                            item.recipe.display().to_string(),
                                            ColorImage::from_rgb([w, h], &frames[0]),
                                            TextureOptions::LINEAR,
                                        )
                                    },
                                );
                        }
                        let resp = match &item.thumb {
                            Some(t) => ui.add(egui::Button::image(
                                egui::Image::from_texture(t).fit_to_exact_size(Vec2::splat(56.0)),
                            )),
                            None => ui.add_sized(
                                Vec2::splat(60.0),
                                egui::Button::new(item.prompt.chars().take(14).collect::<String>()),
                            ),
                        };
                        if resp
                            .on_hover_text(format!("{}\nclick: replay", item.prompt))
                            .clicked()
                        {
                            replay = Some(i);
                        }
                        if ui.small_button("remix").clicked() {
                            remix = Some(i);
                        }
                    });
                }
            });
        });
        if let Some(i) = replay {
            self.replay(ui.ctx(), i);
        }
        if let Some(i) = remix {
            let recipe = self.gallery[i].recipe.clone();
            self.remix(&recipe);
        }
    }

    fn replay(&mut self, ctx: &egui::Context, i: usize) {
        let item = &self.gallery[i];
        let (clip, recipe) = (item.clip.clone(), item.recipe.clone());
        let Some(sheet) = &item.sheet else {
            self.message = Some(Message::Info(
                "no frames kept for this clip (not made in the viewer): remix it instead".into(),
            ));
            return;
        };
        match read_sheet(sheet) {
            Ok((w, h, frames)) => {
                let fps = read_recipe(&recipe).and_then(|r| r.fps).unwrap_or(8.0);
                self.set_frames(Frames::upload(ctx, "clip", w, h, &frames));
                self.playback = Playback {
                    playing: true,
                    frame: 0,
                    fps,
                    t0: ctx.input(|i| i.time),
                };
                self.current = Some(Saved {
                    clip,
                    recipe,
                    width: w,
                    height: h,
                    fps,
                    frames,
                });
            }
            Err(e) => self.message = Some(Message::Error(format!("{e:#}"))),
        }
    }

    /// Loads every setting of a recipe into the panel.
    pub fn remix(&mut self, recipe: &Path) {
        match crate::controls_from_recipe(recipe, &self.controls) {
            Ok(c) => {
                self.controls = c;
                if let Ok(d) = self.backend.defaults(&self.controls.model) {
                    self.defaults = d;
                }
                self.message = Some(Message::Info(format!("remix of {}", recipe.display())));
            }
            Err(e) => self.message = Some(Message::Error(format!("{e:#}"))),
        }
    }
}

/// What decides whether a file dialog can appear.
struct DialogEnv {
    /// A D-Bus session bus to reach the desktop's file-chooser portal.
    session_bus: bool,
    /// zenity, the dialog rfd falls back to without a portal.
    zenity: bool,
}

fn dialog_env() -> DialogEnv {
    let runtime_bus = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("bus"))
        .is_some_and(|p| p.exists());
    let zenity = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("zenity").is_file()));
    DialogEnv {
        session_bus: std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() || runtime_bus,
        zenity,
    }
}

/// Why no file dialog can appear here, if none can: rfd asks the desktop's
/// portal over the session bus, else runs zenity.
fn file_dialog_unavailable(env: &DialogEnv) -> Option<String> {
    (!env.session_bus && !env.zenity).then(|| {
        "no file dialog on this desktop (no D-Bus session bus for the file-chooser portal, \
         no zenity): drop the image on the window or type its path"
            .to_string()
    })
}

/// The viewer keeps every clip it writes as one PNG with the frames stacked
/// vertically, beside the clip: the gallery's thumbnail and replay source,
/// without decoding video.
fn sheet_path(clip: &Path) -> PathBuf {
    clip.with_extension("frames.png")
}

fn write_sheet(saved: &Saved) -> anyhow::Result<()> {
    let data: Vec<u8> = saved.frames.concat();
    let img = image::RgbImage::from_raw(
        saved.width as u32,
        (saved.height * saved.frames.len()) as u32,
        data,
    )
    .ok_or_else(|| anyhow::anyhow!("frames do not match the clip's size"))?;
    img.save(sheet_path(&saved.clip))?;
    Ok(())
}

/// A recipe sidecar of the outputs folder; `None` when it is not one.
fn read_recipe(path: &Path) -> Option<Recipe> {
    let text = std::fs::read_to_string(path).ok()?;
    Recipe::from_json(&text).ok()
}

/// (width, height, frames) of a frame sheet; the frame height comes from
/// the recipe beside it.
fn read_sheet(path: &Path) -> anyhow::Result<(usize, usize, Vec<Vec<u8>>)> {
    let img = image::open(path)?.to_rgb8();
    let (w, total_h) = (img.width() as usize, img.height() as usize);
    let recipe = path
        .to_string_lossy()
        .trim_end_matches(".frames.png")
        .to_string()
        + ".json";
    let h = read_recipe(Path::new(&recipe))
        .and_then(|r| r.height)
        .map(|h| h as usize)
        .filter(|&h| h > 0 && total_h % h == 0)
        .ok_or_else(|| anyhow::anyhow!("{}: no frame height in its recipe", path.display()))?;
    let data = img.into_raw();
    let frames = data.chunks(w * h * 3).map(|c| c.to_vec()).collect();
    Ok((w, h, frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_dialog_needs_a_portal_or_zenity() {
        let env = |session_bus, zenity| DialogEnv {
            session_bus,
            zenity,
        };
        let why = file_dialog_unavailable(&env(false, false)).expect("no way to show a dialog");
        assert!(
            why.contains("portal") && why.contains("drop the image"),
            "{why}"
        );
        assert!(file_dialog_unavailable(&env(true, false)).is_none());
        assert!(file_dialog_unavailable(&env(false, true)).is_none());
    }
}
