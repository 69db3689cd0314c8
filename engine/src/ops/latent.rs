//! The per-element work of a denoising loop on the GPU (`shaders/latent.wgsl`),
//! so that latents stay on the device from the first step to the decode:
//! the model's input batch, classifier-free guidance, a scheduler's update
//! as a short [`ElementProgram`], camera guidance's pull towards the first
//! frame, the still's anchoring of the first frame, the per-frame repeat of
//! text embeddings, and the regrouping and quantisation of decoded frames.
//! Each has its CPU reference here.
//!
//! A scheduler step is a few multiply-adds per latent with coefficients
//! that change per step; rather than one kernel per scheduler and
//! parametrisation, the scheduler writes its update as a program of f32
//! operations (computed on the CPU, passed as parameters) that one kernel
//! interprets per element, in the same order as the CPU reference runs it.

use bytemuck::{Pod, Zeroable};

use super::{check_rank, params_bytes};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, Gpu, Kernel};
use crate::tensor::{fmt_shape, DType, Tensor};

const SOURCE: &str = include_str!("../../../shaders/latent.wgsl");
const WG: u64 = 256;
/// Registers of a program (`REGISTERS` in the shader): every builder call
/// takes a fresh one, and UniPC's second-order corrector and predictor in
/// one step take 26.
const REGISTERS: usize = 32;
/// Instructions and constants a program may have (the parameter block's).
const MAX_INSTRUCTIONS: usize = 32;
const MAX_CONSTANTS: usize = 16;
/// Inputs and outputs of a program (the shader's storage slots; five
/// inputs and three outputs are the eight storage buffers a stage may
/// bind under WebGPU's default limits).
pub const MAX_PROGRAM_INPUTS: usize = 5;
pub const MAX_PROGRAM_OUTPUTS: usize = 3;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    count: u32,
    k: u32,
    m: u32,
    first: u32,
    instructions: u32,
    scale: f32,
    divisor: f32,
    code: [[u32; 4]; MAX_INSTRUCTIONS],
    consts: [f32; MAX_CONSTANTS],
}

impl Params {
    fn new(n: usize) -> Self {
        Params {
            n: n as u32,
            count: 1,
            k: 1,
            m: 1,
            divisor: 1.0,
            ..Zeroable::zeroed()
        }
    }
}

fn kernel(entry: &'static str, dtype: DType) -> Kernel {
    Kernel {
        op: "latent",
        source: SOURCE,
        entry,
        dtype,
        constants: Vec::new(),
    }
}

/// Fails unless `t` fits one storage binding: latents are small (a 512x512
/// 16-frame clip's are 1 MiB), so these kernels do not split their inputs.
fn check_fits(gpu: &Gpu, op: &'static str, t: &Tensor) -> Result<()> {
    if !t.fits_binding(gpu) {
        return Err(EngineError::Shape {
            op,
            expected: format!("at most {} bytes (one binding)", gpu.max_binding_bytes()),
            found: format!("{} ({} bytes)", fmt_shape(t.shape()), t.size_bytes()),
        });
    }
    Ok(())
}

fn check_dtype(op: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(EngineError::DType {
            op,
            expected: dtype.to_string(),
            found: t.dtype().to_string(),
        });
    }
    Ok(())
}

/// A value of a program: a register holding a per-element value, or one of
/// the program's constants (a per-step coefficient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Register(u8),
    Constant(u8),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Instr {
    Load {
        dst: u8,
        input: u8,
    },
    Add {
        dst: u8,
        a: Value,
        b: Value,
    },
    Sub {
        dst: u8,
        a: Value,
        b: Value,
    },
    Mul {
        dst: u8,
        a: Value,
        b: Value,
    },
    Div {
        dst: u8,
        a: Value,
        b: Value,
    },
    /// `clamp(a, -bound, bound)`.
    Clamp {
        dst: u8,
        a: Value,
        bound: Value,
    },
    Store {
        output: u8,
        a: Value,
    },
}

/// A per-element f32 computation over up to [`MAX_PROGRAM_INPUTS`] tensors
/// into up to [`MAX_PROGRAM_OUTPUTS`], built operation by operation (each
/// builder call is one f32 operation, rounded as Rust rounds it), run by
/// [`run_program`] on the GPU and [`run_program_reference`] on the CPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ElementProgram {
    code: Vec<Instr>,
    consts: Vec<f32>,
    registers: u8,
    inputs: usize,
    outputs: usize,
    /// Set when the program outgrew the parameter block; reported by
    /// [`run_program`] (a bug in the scheduler that built it).
    overflow: bool,
}

impl ElementProgram {
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&mut self) -> u8 {
        if self.registers as usize >= REGISTERS {
            self.overflow = true;
            return 0;
        }
        self.registers += 1;
        self.registers - 1
    }

    fn push(&mut self, instr: Instr) {
        if self.code.len() >= MAX_INSTRUCTIONS {
            self.overflow = true;
        } else {
            self.code.push(instr);
        }
    }

    /// The `slot`th input's element.
    pub fn input(&mut self, slot: usize) -> Value {
        let dst = self.register();
        if slot >= MAX_PROGRAM_INPUTS {
            self.overflow = true;
        }
        self.inputs = self.inputs.max(slot + 1);
        self.push(Instr::Load {
            dst,
            input: slot as u8,
        });
        Value::Register(dst)
    }

    /// A constant (the same for every element).
    pub fn constant(&mut self, value: f32) -> Value {
        if let Some(i) = self
            .consts
            .iter()
            .position(|c| c.to_bits() == value.to_bits())
        {
            return Value::Constant(i as u8);
        }
        if self.consts.len() >= MAX_CONSTANTS {
            self.overflow = true;
            return Value::Constant(0);
        }
        self.consts.push(value);
        Value::Constant(self.consts.len() as u8 - 1)
    }

    fn binary(&mut self, make: fn(u8, Value, Value) -> Instr, a: Value, b: Value) -> Value {
        let dst = self.register();
        self.push(make(dst, a, b));
        Value::Register(dst)
    }

    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.binary(|dst, a, b| Instr::Add { dst, a, b }, a, b)
    }

    pub fn sub(&mut self, a: Value, b: Value) -> Value {
        self.binary(|dst, a, b| Instr::Sub { dst, a, b }, a, b)
    }

    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.binary(|dst, a, b| Instr::Mul { dst, a, b }, a, b)
    }

    pub fn div(&mut self, a: Value, b: Value) -> Value {
        self.binary(|dst, a, b| Instr::Div { dst, a, b }, a, b)
    }

    /// `a.clamp(-bound, bound)`.
    pub fn clamp(&mut self, a: Value, bound: Value) -> Value {
        self.binary(|dst, a, bound| Instr::Clamp { dst, a, bound }, a, bound)
    }

    /// Writes `a` to the `slot`th output.
    pub fn store(&mut self, slot: usize, a: Value) {
        if slot >= MAX_PROGRAM_OUTPUTS {
            self.overflow = true;
        }
        self.outputs = self.outputs.max(slot + 1);
        self.push(Instr::Store {
            output: slot as u8,
            a,
        });
    }

    /// Inputs the program reads (slots 0..inputs).
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Outputs the program writes (slots 0..outputs).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    fn check(&self) -> Result<()> {
        if self.overflow {
            return Err(EngineError::Argument {
                op: "latent program",
                message: format!(
                    "a program has at most {MAX_INSTRUCTIONS} instructions, {REGISTERS} \
                     registers, {MAX_CONSTANTS} constants, {MAX_PROGRAM_INPUTS} inputs and \
                     {MAX_PROGRAM_OUTPUTS} outputs; this one has more"
                ),
            });
        }
        Ok(())
    }

    fn encode(&self) -> ([[u32; 4]; MAX_INSTRUCTIONS], [f32; MAX_CONSTANTS]) {
        let v = |x: Value| match x {
            Value::Register(r) => r as u32,
            Value::Constant(c) => REGISTERS as u32 + c as u32,
        };
        let mut code = [[0u32; 4]; MAX_INSTRUCTIONS];
        for (row, instr) in code.iter_mut().zip(&self.code) {
            *row = match *instr {
                Instr::Load { dst, input } => [0, dst as u32, input as u32, 0],
                Instr::Add { dst, a, b } => [2, dst as u32, v(a), v(b)],
                Instr::Sub { dst, a, b } => [3, dst as u32, v(a), v(b)],
                Instr::Mul { dst, a, b } => [4, dst as u32, v(a), v(b)],
                Instr::Div { dst, a, b } => [5, dst as u32, v(a), v(b)],
                Instr::Clamp { dst, a, bound } => [6, dst as u32, v(a), v(bound)],
                Instr::Store { output, a } => [7, output as u32, v(a), 0],
            };
        }
        let mut consts = [0f32; MAX_CONSTANTS];
        consts[..self.consts.len()].copy_from_slice(&self.consts);
        (code, consts)
    }
}

/// Runs `program` on every element of `inputs` (f32 tensors of one element
/// count) on the GPU; returns its outputs, f32 of the same shape.
pub fn run_program(gpu: &Gpu, program: &ElementProgram, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    const OP: &str = "latent program";
    program.check()?;
    if inputs.len() != program.inputs() || inputs.is_empty() {
        return Err(EngineError::Argument {
            op: OP,
            message: format!(
                "the program reads {} inputs, {} given",
                program.inputs(),
                inputs.len()
            ),
        });
    }
    let shape = inputs[0].shape();
    for t in inputs {
        check_dtype(OP, t, DType::F32)?;
        check_fits(gpu, OP, t)?;
        if t.numel() != inputs[0].numel() {
            return Err(EngineError::Shape {
                op: OP,
                expected: format!("inputs of {} elements", inputs[0].numel()),
                found: fmt_shape(t.shape()),
            });
        }
    }
    let n = inputs[0].numel();
    let outputs = (0..program.outputs())
        .map(|_| Tensor::empty(gpu, shape, DType::F32))
        .collect::<Result<Vec<_>>>()?;
    // Unused slots still need a buffer: they repeat a used one (inputs are
    // only read), or get a scratch tensor no instruction writes.
    let scratch = (program.outputs() < MAX_PROGRAM_OUTPUTS)
        .then(|| Tensor::empty(gpu, &[1], DType::F32))
        .transpose()?;
    let (code, consts) = program.encode();
    let p = Params {
        instructions: program.code.len() as u32,
        code,
        consts,
        ..Params::new(n)
    };
    let mut bindings = Vec::with_capacity(MAX_PROGRAM_INPUTS + MAX_PROGRAM_OUTPUTS);
    for (slot, binding) in [1, 2, 3, 18, 19].into_iter().enumerate() {
        let t = inputs.get(slot).unwrap_or(&inputs[0]);
        bindings.push((binding, t.binding()));
    }
    for slot in 0..MAX_PROGRAM_OUTPUTS {
        let t = match outputs.get(slot) {
            Some(t) => t,
            None => scratch.as_ref().expect("made when a slot is unused"),
        };
        bindings.push((4 + slot as u32, t.binding()));
    }
    gpu.dispatch(
        &kernel("run_program", DType::F32),
        params_bytes(&p),
        &bindings,
        grid_1d((n as u64).div_ceil(WG)),
    )?;
    Ok(outputs)
}

/// The CPU reference of [`run_program`]: the same f32 operations in the
/// same order.
pub fn run_program_reference(program: &ElementProgram, inputs: &[&[f32]]) -> Vec<Vec<f32>> {
    let n = inputs.first().map_or(0, |x| x.len());
    let mut outputs = vec![vec![0f32; n]; program.outputs()];
    let mut r = [0f32; REGISTERS];
    for i in 0..n {
        let get = |r: &[f32; REGISTERS], v: Value| match v {
            Value::Register(k) => r[k as usize],
            Value::Constant(c) => program.consts[c as usize],
        };
        for instr in &program.code {
            match *instr {
                Instr::Load { dst, input } => r[dst as usize] = inputs[input as usize][i],
                Instr::Add { dst, a, b } => r[dst as usize] = get(&r, a) + get(&r, b),
                Instr::Sub { dst, a, b } => r[dst as usize] = get(&r, a) - get(&r, b),
                Instr::Mul { dst, a, b } => r[dst as usize] = get(&r, a) * get(&r, b),
                Instr::Div { dst, a, b } => r[dst as usize] = get(&r, a) / get(&r, b),
                Instr::Clamp { dst, a, bound } => {
                    let c = get(&r, bound);
                    r[dst as usize] = get(&r, a).clamp(-c, c)
                }
                Instr::Store { output, a } => outputs[output as usize][i] = get(&r, a),
            }
        }
    }
    outputs
}

/// The model's input batch from latents `x` (f32): `x / divisor` (the
/// scheduler's input scaling; 1 leaves it unchanged) repeated `count`
/// times, in `dtype`: shape [count, ..x's shape].
pub fn batch_input(
    gpu: &Gpu,
    x: &Tensor,
    divisor: f32,
    count: usize,
    dtype: DType,
) -> Result<Tensor> {
    const OP: &str = "batch_input";
    check_dtype(OP, x, DType::F32)?;
    check_fits(gpu, OP, x)?;
    let mut shape = vec![count];
    shape.extend_from_slice(x.shape());
    let out = Tensor::empty(gpu, &shape, dtype)?;
    check_fits(gpu, OP, &out)?;
    let p = Params {
        count: count as u32,
        divisor,
        ..Params::new(x.numel())
    };
    gpu.dispatch(
        &kernel("batch_input", dtype),
        params_bytes(&p),
        &[(7, x.binding()), (8, out.binding())],
        grid_1d((out.numel() as u64).div_ceil(WG)),
    )?;
    Ok(out)
}

/// Classifier-free guidance on the GPU for a prediction batched as
/// [uncond, cond] (AnimateDiff): `uncond + scale · (cond − uncond)` in f32,
/// shape [...]; a prediction [1, ...] (no guidance) is converted to f32.
pub fn guide(gpu: &Gpu, prediction: &Tensor, scale: f32) -> Result<Tensor> {
    let batch = prediction.shape().first().copied().unwrap_or(0);
    if !(batch == 1 || batch == 2) {
        return Err(EngineError::Shape {
            op: "guide",
            expected: "a prediction batched [uncond, cond] or [cond]".into(),
            found: fmt_shape(prediction.shape()),
        });
    }
    let n = prediction.numel() / batch;
    let uncond = (batch == 2).then_some((prediction, 0));
    guide_at(
        gpu,
        uncond,
        (prediction, (batch - 1) * n),
        &prediction.shape()[1..],
        scale,
    )
}

/// Classifier-free guidance for predictions made in separate passes
/// (Wan): `uncond + scale · (cond − uncond)` in f32; without `uncond`,
/// `cond` in f32.
pub fn guide_pair(gpu: &Gpu, uncond: Option<&Tensor>, cond: &Tensor, scale: f32) -> Result<Tensor> {
    if let Some(u) = uncond {
        if u.shape() != cond.shape() || u.dtype() != cond.dtype() {
            return Err(EngineError::Shape {
                op: "guide",
                expected: format!(
                    "uncond like cond, {} {}",
                    cond.dtype(),
                    fmt_shape(cond.shape())
                ),
                found: format!("{} {}", u.dtype(), fmt_shape(u.shape())),
            });
        }
    }
    guide_at(gpu, uncond.map(|u| (u, 0)), (cond, 0), cond.shape(), scale)
}

/// Guidance of the predictions at element offsets in their tensors, into
/// a tensor of `shape`.
fn guide_at(
    gpu: &Gpu,
    uncond: Option<(&Tensor, usize)>,
    (cond, cond_at): (&Tensor, usize),
    shape: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "guide";
    check_fits(gpu, OP, cond)?;
    let out = Tensor::empty(gpu, shape, DType::F32)?;
    let (u, u_at) = uncond.unwrap_or((cond, 0));
    check_fits(gpu, OP, u)?;
    let p = Params {
        count: if uncond.is_some() { 2 } else { 1 },
        k: u_at as u32,
        m: cond_at as u32,
        scale,
        ..Params::new(out.numel())
    };
    gpu.dispatch(
        &kernel("guide", cond.dtype()),
        params_bytes(&p),
        &[(9, u.binding()), (17, cond.binding()), (10, out.binding())],
        grid_1d((out.numel() as u64).div_ceil(WG)),
    )?;
    Ok(out)
}

/// The CPU reference of [`guide`].
pub fn guide_reference(prediction: &[f32], batch: usize, scale: f32) -> Vec<f32> {
    if batch == 1 {
        return prediction.to_vec();
    }
    let (u, c) = prediction.split_at(prediction.len() / 2);
    u.iter().zip(c).map(|(u, c)| u + scale * (c - u)).collect()
}

/// Rows [B, ...] → [B, times, ...]: each row repeated `times` times (a
/// prompt's embeddings for every frame of the clip).
pub fn repeat_rows(gpu: &Gpu, rows: &Tensor, times: usize) -> Result<Tensor> {
    const OP: &str = "repeat_rows";
    if rows.rank() == 0 {
        return Err(EngineError::Shape {
            op: OP,
            expected: "rows [B, ...]".into(),
            found: fmt_shape(rows.shape()),
        });
    }
    let b = rows.shape()[0];
    let mut shape = vec![b, times];
    shape.extend_from_slice(&rows.shape()[1..]);
    let out = Tensor::empty(gpu, &shape, rows.dtype())?;
    check_fits(gpu, OP, &out)?;
    let p = Params {
        count: b as u32,
        k: times as u32,
        ..Params::new(rows.numel() / b.max(1))
    };
    gpu.dispatch(
        &kernel("repeat_rows", rows.dtype()),
        params_bytes(&p),
        &[(11, rows.binding()), (12, out.binding())],
        grid_1d((out.numel() as u64).div_ceil(WG)),
    )?;
    Ok(out)
}

/// Frames `first..first + count` of latents [C, F, h, w] (f32), regrouped
/// as the VAE decodes them: [count, C, h, w] in `dtype`.
pub fn latent_frames(
    gpu: &Gpu,
    latents: &Tensor,
    first: usize,
    count: usize,
    dtype: DType,
) -> Result<Tensor> {
    const OP: &str = "latent_frames";
    check_rank(OP, "latents [C, F, h, w]", latents, 4)?;
    check_dtype(OP, latents, DType::F32)?;
    check_fits(gpu, OP, latents)?;
    let [c, f, h, w] = [0, 1, 2, 3].map(|d| latents.shape()[d]);
    if first + count > f {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("frames {first}..{} of at most {f}", first + count),
            found: fmt_shape(latents.shape()),
        });
    }
    let out = Tensor::empty(gpu, &[count, c, h, w], dtype)?;
    let p = Params {
        count: count as u32,
        m: c as u32,
        k: f as u32,
        first: first as u32,
        ..Params::new(h * w)
    };
    gpu.dispatch(
        &kernel("latent_frames", dtype),
        params_bytes(&p),
        &[(15, latents.binding()), (16, out.binding())],
        grid_1d((out.numel() as u64).div_ceil(WG)),
    )?;
    Ok(out)
}

/// Decoded images [n, 3, H, W] in [-1, 1] → RGB8 frames [H, W, 3], with
/// diffusers' postprocessing (x / 2 + 0.5 clamped to [0, 1]) rounded to
/// bytes on the GPU: the download is a quarter of the f32 images'.
pub fn frames_rgb8(gpu: &Gpu, images: &Tensor) -> Result<Vec<Vec<u8>>> {
    const OP: &str = "frames_rgb8";
    check_rank(OP, "images [n, 3, H, W]", images, 4)?;
    check_fits(gpu, OP, images)?;
    let [n, ch, h, w] = [0, 1, 2, 3].map(|d| images.shape()[d]);
    if ch != 3 {
        return Err(EngineError::Shape {
            op: OP,
            expected: "images [n, 3, H, W]".into(),
            found: fmt_shape(images.shape()),
        });
    }
    let bytes = n * h * w * 3;
    let words = Tensor::empty(gpu, &[bytes.div_ceil(4)], DType::F32)?;
    let p = Params {
        count: n as u32,
        ..Params::new(h * w)
    };
    gpu.dispatch(
        &kernel("frames_rgb8", images.dtype()),
        params_bytes(&p),
        &[(13, images.binding()), (14, words.binding())],
        grid_1d((words.numel() as u64).div_ceil(WG)),
    )?;
    let packed = gpu.read(words.buffer(), 0, bytes as u64)?;
    Ok(packed.chunks(h * w * 3).map(<[u8]>::to_vec).collect())
}

/// The CPU reference of [`frames_rgb8`] for one image [3, H, W]: `out`
/// [H, W, 3] gets the [0, 1] values, the return value the bytes.
pub fn frame_reference(image: &[f32], out: &mut [f32]) -> Vec<u8> {
    let pixels = out.len() / 3;
    let mut rgb = vec![0u8; pixels * 3];
    for p in 0..pixels {
        for k in 0..3 {
            let v = (image[k * pixels + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            out[p * 3 + k] = v;
            rgb[p * 3 + k] = (v * 255.0).round() as u8;
        }
    }
    rgb
}

/// The coefficients of [`camera_mix`]: latents split as `a·x0 + b·eps`
/// (the scheduler's noise level at the next step), the clean parts mixed
/// as `keep_x·own + take_x·warped`, the noise parts as
/// `keep_e·own + take_e·warped`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CameraMix {
    pub a: f32,
    pub b: f32,
    pub keep_x: f32,
    pub take_x: f32,
    pub keep_e: f32,
    pub take_e: f32,
}

/// Values per pixel of a [`camera_mix`] warp table: four plane offsets
/// (y0·w+x0, y0·w+x1, y1·w+x0, y1·w+x1) as whole f32, then fx and fy.
pub const WARP_VALUES: usize = 6;

/// Largest latent plane a warp table addresses: its offsets are whole f32,
/// exact below 2^24.
pub const MAX_WARP_PLANE: usize = 1 << 24;

/// Camera guidance's mix on the GPU: latents `x` [C, F, h, w] and their
/// clean estimate `x0` (f32, same shape) → latents whose frames 1.. are
/// pulled towards frame 0 sampled bilinearly at the pixels `warp`
/// ([F − 1, h·w, WARP_VALUES], f32) names; frame 0 is copied.
pub fn camera_mix(
    gpu: &Gpu,
    x: &Tensor,
    x0: &Tensor,
    warp: &Tensor,
    mix: CameraMix,
) -> Result<Tensor> {
    const OP: &str = "camera_mix";
    check_rank(OP, "latents [C, F, h, w]", x, 4)?;
    let [c, f, h, w] = [0, 1, 2, 3].map(|d| x.shape()[d]);
    for t in [x, x0, warp] {
        check_dtype(OP, t, DType::F32)?;
        check_fits(gpu, OP, t)?;
    }
    if x0.shape() != x.shape() {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("x0 like the latents, {}", fmt_shape(x.shape())),
            found: fmt_shape(x0.shape()),
        });
    }
    let warp_len = f.saturating_sub(1) * h * w * WARP_VALUES;
    if warp.numel() != warp_len || h * w > MAX_WARP_PLANE {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!(
                "a warp table of {warp_len} values ([{}, {}, {WARP_VALUES}]) for a plane of at most {MAX_WARP_PLANE} pixels",
                f.saturating_sub(1),
                h * w
            ),
            found: format!("{} for latents {}", fmt_shape(warp.shape()), fmt_shape(x.shape())),
        });
    }
    let out = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let mut consts = [0f32; MAX_CONSTANTS];
    consts[..6].copy_from_slice(&[mix.a, mix.b, mix.keep_x, mix.take_x, mix.keep_e, mix.take_e]);
    let p = Params {
        count: c as u32,
        k: f as u32,
        consts,
        ..Params::new(h * w)
    };
    gpu.dispatch(
        &kernel("camera_mix", DType::F32),
        params_bytes(&p),
        &[
            (20, x.binding()),
            (21, x0.binding()),
            (22, warp.binding()),
            (23, out.binding()),
        ],
        grid_1d((out.numel() as u64).div_ceil(WG)),
    )?;
    Ok(out)
}

/// The CPU reference of [`camera_mix`] for latents of `shape` [C, F, h, w]:
/// the same f32 operations in the same order.
pub fn camera_mix_reference(
    x: &[f32],
    x0: &[f32],
    warp: &[f32],
    shape: [usize; 4],
    mix: CameraMix,
) -> Vec<f32> {
    let [c, f, h, w] = shape;
    let plane = h * w;
    let CameraMix {
        a,
        b,
        keep_x,
        take_x,
        keep_e,
        take_e,
    } = mix;
    let eps: Vec<f32> = x.iter().zip(x0).map(|(l, x)| (l - a * x) / b).collect();
    let bilinear = |values: &[f32], m: &[f32]| {
        let (fx, fy) = (m[4], m[5]);
        let row0 = values[m[0] as usize] * (1.0 - fx) + values[m[1] as usize] * fx;
        let row1 = values[m[2] as usize] * (1.0 - fx) + values[m[3] as usize] * fx;
        row0 * (1.0 - fy) + row1 * fy
    };
    let mut out = x.to_vec();
    for ch in 0..c {
        let first = ch * f * plane;
        for fi in 1..f {
            for at in 0..plane {
                let m = &warp[((fi - 1) * plane + at) * WARP_VALUES..][..WARP_VALUES];
                let o = first + fi * plane + at;
                let warped_x0 = bilinear(&x0[first..first + plane], m);
                let warped_eps = bilinear(&eps[first..first + plane], m);
                let xm = keep_x * x0[o] + take_x * warped_x0;
                let em = keep_e * eps[o] + take_e * warped_eps;
                out[o] = a * xm + b * em;
            }
        }
    }
    out
}

/// Latents `x` [C, F, h, w] (f32) with frame `index` replaced by `frame`
/// [C, h, w] (f32): the still's anchoring of the first frame.
pub fn put_frame(gpu: &Gpu, x: &Tensor, index: usize, frame: &Tensor) -> Result<Tensor> {
    const OP: &str = "put_frame";
    check_rank(OP, "latents [C, F, h, w]", x, 4)?;
    let [c, f, h, w] = [0, 1, 2, 3].map(|d| x.shape()[d]);
    for t in [x, frame] {
        check_dtype(OP, t, DType::F32)?;
        check_fits(gpu, OP, t)?;
    }
    if frame.shape() != [c, h, w] || index >= f {
        return Err(EngineError::Shape {
            op: OP,
            expected: format!("frame [{c}, {h}, {w}] at an index below {f}"),
            found: format!("{} at {index}", fmt_shape(frame.shape())),
        });
    }
    let out = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let p = Params {
        count: c as u32,
        k: f as u32,
        first: index as u32,
        ..Params::new(h * w)
    };
    gpu.dispatch(
        &kernel("put_frame", DType::F32),
        params_bytes(&p),
        &[
            (24, x.binding()),
            (25, frame.binding()),
            (26, out.binding()),
        ],
        grid_1d((out.numel() as u64).div_ceil(WG)),
    )?;
    Ok(out)
}

/// The CPU reference of [`put_frame`] for latents of `shape` [C, F, h, w].
pub fn put_frame_reference(x: &mut [f32], shape: [usize; 4], index: usize, frame: &[f32]) {
    let [c, f, h, w] = shape;
    let plane = h * w;
    for ch in 0..c {
        let o = (ch * f + index) * plane;
        x[o..o + plane].copy_from_slice(&frame[ch * plane..(ch + 1) * plane]);
    }
}
