//! The window: winit's event loop, egui-winit for input, egui-wgpu's painter
//! on the engine's own instance, adapter, device and queue.

use std::num::NonZeroU32;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use egui::{ColorImage, ViewportCommand, ViewportId};
use egui_wgpu::winit::Painter;
use egui_wgpu::{RendererOptions, WgpuConfiguration, WgpuSetup, WgpuSetupExisting};
use motif_engine::Gpu;
use winit::application::ApplicationHandler;
use winit::event::{StartCause, WindowEvent};
use winit::event_loop::{ActiveEventLoop, ControlFlow, EventLoop};
use winit::window::{Window, WindowId};

use crate::ui::{NativeTextures, Viewer};
use crate::worker::Worker;
use crate::{Backend, Options};

/// Sent by the worker to wake the event loop.
struct Wake;

struct Shown {
    window: Arc<Window>,
    state: egui_winit::State,
}

struct App {
    ctx: egui::Context,
    painter: Painter,
    device: motif_engine::wgpu::Device,
    viewer: Viewer,
    shown: Option<Shown>,
    /// When egui next wants a frame, if not at once.
    repaint_at: Option<Instant>,
    screenshots: (
        std::sync::mpsc::Sender<Arc<ColorImage>>,
        Receiver<Arc<ColorImage>>,
    ),
    error: Option<anyhow::Error>,
    exit_code: i32,
}

pub fn run(gpu: Gpu, backend: Box<dyn Backend>, options: Options) -> Result<i32> {
    let event_loop = EventLoop::<Wake>::with_user_event()
        .build()
        .context("opening the window system (is DISPLAY or WAYLAND_DISPLAY set?)")?;
    let (instance, adapter, device, queue) = gpu.wgpu_handles();
    let config = WgpuConfiguration {
        wgpu_setup: WgpuSetup::Existing(WgpuSetupExisting {
            instance,
            adapter,
            device: device.clone(),
            queue,
        }),
        ..Default::default()
    };
    let ctx = egui::Context::default();
    let painter = pollster::block_on(Painter::new(
        ctx.clone(),
        config,
        false,
        RendererOptions::default(),
    ));
    let backend: Arc<dyn Backend> = Arc::from(backend);
    let (updates_tx, updates) = channel();
    let proxy = event_loop.create_proxy();
    let worker = Worker::start(gpu, backend.clone(), updates_tx, move || {
        let _ = proxy.send_event(Wake);
    });
    let viewer = Viewer::new(options, backend, worker, updates);
    let mut app = App {
        ctx,
        painter,
        device,
        viewer,
        shown: None,
        repaint_at: None,
        screenshots: channel(),
        error: None,
        exit_code: 0,
    };
    event_loop.run_app(&mut app).context("running the window")?;
    if let Some(e) = app.error {
        return Err(e);
    }
    Ok(app.exit_code)
}

impl App {
    fn redraw(&mut self, event_loop: &ActiveEventLoop) -> Result<()> {
        let Some(shown) = &mut self.shown else {
            return Ok(());
        };
        let raw = shown.state.take_egui_input(&shown.window);
        let viewer = &mut self.viewer;
        let renderer = self
            .painter
            .render_state()
            .map(|s| s.renderer)
            .ok_or_else(|| anyhow!("the window has no renderer yet"))?;
        let mut native = EguiTextures {
            device: &self.device,
            renderer: &renderer,
        };
        let mut out = self.ctx.run_ui(raw, |ui| viewer.show(ui, &mut native));
        let ppp = out.pixels_per_point;
        // The window's screenshot is of the frame just laid out.
        let mut captures = Vec::new();
        let mut clip_rect = None;
        if viewer.want_screenshot {
            viewer.want_screenshot = false;
            clip_rect = viewer.clip_rect;
            let tx = self.screenshots.0.clone();
            captures.push(egui::ScreenshotCallback::new(move |image| {
                let _ = tx.send(image);
            }));
        }
        let viewport = out.viewport_output.remove(&ViewportId::ROOT);
        if let Some(vp) = &viewport {
            for cmd in &vp.commands {
                if let ViewportCommand::Screenshot(cb) = cmd {
                    captures.push(cb.clone());
                }
            }
        }
        shown
            .state
            .handle_platform_output(&shown.window, out.platform_output);
        let prims = self.ctx.tessellate(out.shapes, ppp);
        let capturing = !captures.is_empty();
        self.painter.paint_and_update_textures(
            ViewportId::ROOT,
            ppp,
            [0.08, 0.08, 0.09, 1.0],
            &prims,
            &mut out.textures_delta,
            captures,
            &shown.window,
        );
        if capturing {
            // The capture is read back in a map callback that runs on poll.
            let _ = self
                .device
                .poll(motif_engine::wgpu::PollType::wait_indefinitely());
            let image = self
                .screenshots
                .1
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| anyhow!("the window's screenshot never arrived"))?;
            save_screenshot(&mut self.viewer, &image, clip_rect, ppp)?;
        }
        if let Some(code) = self.viewer.exit {
            if !self.viewer.want_screenshot {
                self.exit_code = code;
                event_loop.exit();
                return Ok(());
            }
        }
        let delay = viewport.map_or(Duration::MAX, |v| v.repaint_delay);
        if delay.is_zero() || self.viewer.want_screenshot {
            shown.window.request_redraw();
            self.repaint_at = None;
        } else if delay < Duration::from_secs(3600) {
            self.repaint_at = Some(Instant::now() + delay);
        } else {
            self.repaint_at = None;
        }
        Ok(())
    }
}

/// The engine's preview textures, drawn by egui-wgpu's renderer as they are.
struct EguiTextures<'a> {
    device: &'a motif_engine::wgpu::Device,
    renderer: &'a egui::mutex::RwLock<egui_wgpu::Renderer>,
}

impl NativeTextures for EguiTextures<'_> {
    fn register(&mut self, view: &motif_engine::wgpu::TextureView) -> egui::TextureId {
        self.renderer.write().register_native_texture(
            self.device,
            view,
            motif_engine::wgpu::FilterMode::Linear,
        )
    }

    fn free(&mut self, id: egui::TextureId) {
        self.renderer.write().free_texture(&id);
    }
}

/// Writes the window's screenshot where the script asked, with the clip's
/// rectangle in it on stdout.
fn save_screenshot(
    viewer: &mut Viewer,
    image: &ColorImage,
    clip_rect: Option<egui::Rect>,
    ppp: f32,
) -> Result<()> {
    let Some(path) = viewer.script().screenshot.clone() else {
        viewer.screenshot_saved();
        return Ok(());
    };
    let [w, h] = image.size;
    let rgba: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
    image::RgbaImage::from_raw(w as u32, h as u32, rgba)
        .ok_or_else(|| anyhow!("screenshot of {w}x{h} has the wrong pixel count"))?
        .save(&path)
        .with_context(|| format!("writing the screenshot {}", path.display()))?;
    println!("screenshot: {}", path.display());
    if let Some(r) = clip_rect {
        // Pixels of the screenshot.
        println!(
            "clip_rect: {} {} {} {}",
            (r.min.x * ppp).round(),
            (r.min.y * ppp).round(),
            (r.width() * ppp).round(),
            (r.height() * ppp).round()
        );
    }
    viewer.screenshot_saved();
    Ok(())
}

impl ApplicationHandler<Wake> for App {
    fn resumed(&mut self, event_loop: &ActiveEventLoop) {
        if self.shown.is_some() {
            return;
        }
        let attrs = Window::default_attributes()
            .with_title("Motif")
            .with_inner_size(winit::dpi::LogicalSize::new(1100.0, 720.0));
        let result = (|| -> Result<Shown> {
            let window = Arc::new(
                event_loop
                    .create_window(attrs)
                    .context("creating the window")?,
            );
            pollster::block_on(
                self.painter
                    .set_window(ViewportId::ROOT, Some(window.clone())),
            )
            .context("drawing on the window with the engine's GPU")?;
            let state = egui_winit::State::new(
                self.ctx.clone(),
                ViewportId::ROOT,
                event_loop,
                Some(window.scale_factor() as f32),
                window.theme(),
                self.painter.max_texture_side(),
            );
            window.request_redraw();
            Ok(Shown { window, state })
        })();
        match result {
            Ok(s) => self.shown = Some(s),
            Err(e) => {
                self.error = Some(e);
                event_loop.exit();
            }
        }
    }

    fn new_events(&mut self, _: &ActiveEventLoop, cause: StartCause) {
        if let StartCause::ResumeTimeReached { .. } = cause {
            if let Some(s) = &self.shown {
                s.window.request_redraw();
            }
        }
    }

    fn user_event(&mut self, _: &ActiveEventLoop, _: Wake) {
        if let Some(s) = &self.shown {
            s.window.request_redraw();
        }
    }

    fn window_event(&mut self, event_loop: &ActiveEventLoop, _: WindowId, event: WindowEvent) {
        let Some(shown) = &mut self.shown else {
            return;
        };
        match &event {
            WindowEvent::CloseRequested => {
                event_loop.exit();
                return;
            }
            WindowEvent::Resized(size) => {
                if let (Some(w), Some(h)) =
                    (NonZeroU32::new(size.width), NonZeroU32::new(size.height))
                {
                    self.painter.on_window_resized(ViewportId::ROOT, w, h);
                }
            }
            WindowEvent::RedrawRequested => {
                if let Err(e) = self.redraw(event_loop) {
                    self.error = Some(e);
                    event_loop.exit();
                }
                return;
            }
            _ => {}
        }
        let response = shown.state.on_window_event(&shown.window, &event);
        if response.repaint {
            shown.window.request_redraw();
        }
    }

    /// The window system's connection closes when the event loop returns:
    /// the surface, the window and egui-winit's clipboard (a Wayland
    /// clipboard thread holds the connection) must go before it.
    fn exiting(&mut self, _: &ActiveEventLoop) {
        self.painter.gc_viewports(&Default::default());
        self.shown = None;
    }

    fn about_to_wait(&mut self, event_loop: &ActiveEventLoop) {
        match self.repaint_at {
            Some(t) => event_loop.set_control_flow(ControlFlow::WaitUntil(t)),
            None => event_loop.set_control_flow(ControlFlow::Wait),
        }
    }
}
