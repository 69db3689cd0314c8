//! The diffusion schedulers AnimateDiff checkpoints ship with, equal to
//! diffusers 0.42: DDIM, Euler, Euler ancestral, DPM-Solver++ 2M and LCM;
//! and the flow-matching samplers of Wan: UniPC with flow sigmas and
//! flow-matching Euler.
//!
//! Their scalar maths (timesteps, σ, ᾱ, the per-step coefficients) runs on
//! the CPU; the per-latent update of every step is a [`StepProgram`] of a
//! few dozen f32 operations per value, which the pipelines run on the GPU
//! where the latents are ([`Scheduler::run_step`], `ops::latent`) and
//! [`Scheduler::step`] runs on the CPU, with the same result bit for bit.
//! The multistep ones (DPM-Solver++ 2M, UniPC) read what earlier steps kept
//! (their x₀ predictions, UniPC's last predictor sample), which the
//! [`Scheduler`] holds where the steps run. Every quantity is
//! computed in the precision and operation order diffusers uses (float32
//! tensors, float64 numpy grids), so timesteps equal diffusers' and sigmas
//! and samples agree to float32 rounding. The noise that Euler ancestral and
//! LCM add is drawn by the caller, which owns the random generator.
//!
//! Use: [`Scheduler::new`] from a [`SchedulerConfig`], then
//! [`Scheduler::set_timesteps`]; multiply the initial noise by
//! [`Scheduler::init_noise_sigma`]; per step `i`, feed the UNet
//! [`Scheduler::scale_model_input`] at timestep `timesteps()[i]`, then call
//! [`Scheduler::step`] with its prediction (with the latents on the GPU:
//! [`Scheduler::input_divisor`], [`Scheduler::step_program`] and
//! [`Scheduler::run_step`]).
//!
//! Flow-matching models (Wan) predict a velocity v = ε − x₀ on
//! x_σ = (1 − σ)·x₀ + σ·ε; their schedules are shifted by `flow_shift` /
//! `shift`, which [`SchedulerOptions::shift`] overrides (`--shift`).

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod flow_match_euler;
mod lcm;
pub(crate) mod reference;
mod schedule;
mod unipc;

use std::fmt;
use std::str::FromStr;

pub use config::SchedulerConfig;

use crate::error::{EngineError, LoadError, Result};
use crate::gpu::Gpu;
use crate::ops::latent::{run_program, run_program_reference, ElementProgram, Value};
use crate::tensor::Tensor;

/// The schedulers Motif implements, by their CLI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    Lcm,
    /// UniPC with flow sigmas (flow-matching models: Wan's default).
    UniPc,
    /// Euler on the flow-matching ODE. On a flow-matching model `euler`
    /// means this one (see [`SchedulerKind::for_config`]).
    FlowMatchEuler,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::Lcm,
        SchedulerKind::UniPc,
        SchedulerKind::FlowMatchEuler,
    ];

    /// The kinds for noise-prediction models (AnimateDiff).
    pub const DIFFUSION: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::Lcm,
    ];

    /// The kinds for flow-matching models (Wan), by the names a user of a
    /// flow model types: `unipc`, `euler`.
    pub const FLOW_MATCHING: [SchedulerKind; 2] =
        [SchedulerKind::UniPc, SchedulerKind::FlowMatchEuler];

    /// The name on the command line (`--scheduler`).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpm++2m",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::FlowMatchEuler => "flow-euler",
        }
    }

    /// The diffusers class that implements it (`_class_name` in configs).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::FlowMatchEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class_name)
    }

    /// Whether the schedule can use Karras et al.'s sigmas (diffusers'
    /// `use_karras_sigmas`).
    pub fn supports_karras(self) -> bool {
        matches!(self, SchedulerKind::Euler | SchedulerKind::DpmPp2m)
    }

    /// Whether the kind samples a flow-matching model (velocity prediction).
    pub fn is_flow_matching(self) -> bool {
        matches!(self, SchedulerKind::UniPc | SchedulerKind::FlowMatchEuler)
    }

    /// The kind that runs for a model with scheduler config `config`: on a
    /// flow-matching model `euler` is flow-matching Euler, the only Euler
    /// that fits it (diffusers users swap in `FlowMatchEulerDiscreteScheduler`
    /// for the same request). A kind for the other type of model is refused,
    /// naming the kinds that fit.
    pub fn for_config(self, config: &SchedulerConfig) -> Result<SchedulerKind> {
        let flow = config.is_flow_matching()?;
        let kind = match self {
            SchedulerKind::Euler if flow => SchedulerKind::FlowMatchEuler,
            k => k,
        };
        let class = config.class_name().unwrap_or("no `_class_name`");
        if kind.is_flow_matching() && !flow {
            return Err(argument(format!(
                "{kind} samples flow-matching models (Wan), but {} is a noise-prediction \
                 model's scheduler ({class}); choose one of {}",
                config.path().display(),
                Self::DIFFUSION.map(|k| k.name()).join(", ")
            )));
        }
        if !kind.is_flow_matching() && flow {
            return Err(argument(format!(
                "{kind} samples noise-prediction models, but {} is a flow-matching model's \
                 scheduler ({class}); choose unipc or euler",
                config.path().display(),
            )));
        }
        Ok(kind)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| EngineError::Argument {
                op: "scheduler",
                message: format!(
                    "unknown scheduler `{s}` (known: {})",
                    Self::ALL.map(|k| k.name()).join(", ")
                ),
            })
    }
}

/// How to build a [`Scheduler`] from a model's config: the overrides a
/// user may give, each `None` for the config's own setting.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerOptions {
    /// The sampler (`--scheduler`); `None` for the config's `_class_name`.
    pub kind: Option<SchedulerKind>,
    /// Karras sigmas on or off (Euler and DPM-Solver++ only).
    pub karras: Option<bool>,
    /// The flow-matching shift (`--shift`, UniPC's `flow_shift`,
    /// flow-matching Euler's `shift`); flow-matching kinds only.
    pub shift: Option<f64>,
}

/// What one denoising step produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The latents for the next step (x_{t-1}).
    pub prev_sample: Vec<f32>,
    /// The scheduler's estimate of the clean latents x₀ at this step, for
    /// previews (diffusers' `pred_original_sample`; for DPM-Solver the
    /// converted model output, for LCM the estimate before the consistency
    /// boundary condition).
    pub pred_original: Vec<f32>,
    /// LCM's `denoised`: the consistency model's output, its x₀ for previews.
    pub denoised: Option<Vec<f32>>,
}

/// One step's per-element update as an [`ElementProgram`], so that it can
/// run where the latents are: [`Scheduler::run_step`] on the GPU,
/// [`Scheduler::step`] on the CPU, with the same result bit for bit.
///
/// Inputs: 0 the sample, 1 the model output, then either the noise (2,
/// where [`StepProgram::reads_noise`]: Euler ancestral, LCM) or the state
/// of earlier steps that the multistep schedulers read (DPM-Solver++'s
/// last x₀; UniPC's last two x₀ and the sample its last predictor started
/// from), which the [`Scheduler`] keeps where the steps run. Outputs: 0 the
/// next sample, 1 `pred_original`, 2 LCM's `denoised` where
/// [`StepProgram::writes_denoised`]; a multistep step's third output is
/// state to keep.
#[derive(Debug, Clone)]
pub struct StepProgram {
    pub program: ElementProgram,
    /// The state slots that the inputs after the model output read, in
    /// input order.
    state_inputs: Vec<usize>,
    /// Outputs kept for later steps: (output, state slot).
    keeps: Vec<(usize, usize)>,
    noise: bool,
    denoised: bool,
}

impl StepProgram {
    pub const SAMPLE: usize = 0;
    pub const MODEL_OUTPUT: usize = 1;
    pub const NOISE: usize = 2;
    pub const PREV_SAMPLE: usize = 0;
    pub const PRED_ORIGINAL: usize = 1;
    pub const DENOISED: usize = 2;

    /// A single-step scheduler's program: it reads noise if it has a third
    /// input and writes `denoised` if it has a third output.
    pub(crate) fn new(program: ElementProgram) -> Self {
        StepProgram {
            noise: program.inputs() > Self::NOISE,
            denoised: program.outputs() > Self::DENOISED,
            program,
            state_inputs: Vec::new(),
            keeps: Vec::new(),
        }
    }

    pub fn reads_noise(&self) -> bool {
        self.noise
    }

    pub fn writes_denoised(&self) -> bool {
        self.denoised
    }

    /// The output a preview shows: `denoised` where there is one, else
    /// `pred_original` (as [`StepOutput`]'s users pick).
    pub fn preview_output(&self) -> usize {
        if self.writes_denoised() {
            Self::DENOISED
        } else {
            Self::PRED_ORIGINAL
        }
    }

    /// The outputs a caller gets: the next sample, `pred_original` and
    /// `denoised` where written (not the state kept for later steps).
    fn caller_outputs(&self) -> usize {
        if self.denoised {
            3
        } else {
            2
        }
    }

    /// The inputs a caller gives: the sample, the model output and the
    /// noise where read (not the state of earlier steps).
    fn caller_inputs(&self) -> usize {
        if self.noise {
            3
        } else {
            2
        }
    }
}

/// A multistep scheduler's step program under construction: the program,
/// and which state of earlier steps it reads and keeps (slots the
/// scheduler numbers).
pub(crate) struct MultistepProgram {
    pub p: ElementProgram,
    reads: Vec<(usize, Value)>,
    keeps: Vec<(usize, usize)>,
}

impl MultistepProgram {
    /// A program that has loaded the sample and the model output.
    pub fn new() -> (Self, Value, Value) {
        let mut p = ElementProgram::new();
        let sample = p.input(StepProgram::SAMPLE);
        let model_output = p.input(StepProgram::MODEL_OUTPUT);
        let builder = MultistepProgram {
            p,
            reads: Vec::new(),
            keeps: Vec::new(),
        };
        (builder, sample, model_output)
    }

    /// The state an earlier step kept in `slot` (read once, however often
    /// asked for).
    pub fn state(&mut self, slot: usize) -> Value {
        if let Some(&(_, v)) = self.reads.iter().find(|(s, _)| *s == slot) {
            return v;
        }
        let v = self
            .p
            .input(StepProgram::MODEL_OUTPUT + 1 + self.reads.len());
        self.reads.push((slot, v));
        v
    }

    /// Stores `value` to `output`, kept in state `slot` for later steps.
    pub fn keep(&mut self, output: usize, value: Value, slot: usize) {
        self.p.store(output, value);
        self.keeps.push((output, slot));
    }

    pub fn finish(self) -> StepProgram {
        StepProgram {
            program: self.p,
            state_inputs: self.reads.into_iter().map(|(slot, _)| slot).collect(),
            keeps: self.keeps,
            noise: false,
            denoised: false,
        }
    }
}

/// `a·x + b·y` in that order of f32 operations.
fn program_axpby(p: &mut ElementProgram, a: f32, x: Value, b: f32, y: Value) -> Value {
    let (a, b) = (p.constant(a), p.constant(b));
    let ax = p.mul(a, x);
    let by = p.mul(b, y);
    p.add(ax, by)
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    Sample,
    V,
}

impl Prediction {
    /// Reads `prediction_type`, epsilon by default, accepting what the class
    /// accepts (`"original_sample"` is Euler's old name for `"sample"`).
    fn from_config(cfg: &SchedulerConfig, accepted: &[&str]) -> Result<Self, LoadError> {
        Ok(
            match cfg.choice("prediction_type", "epsilon", accepted)?.as_str() {
                "epsilon" => Prediction::Epsilon,
                "v_prediction" => Prediction::V,
                _ => Prediction::Sample,
            },
        )
    }
}

/// How inference timesteps are spread over the training ones
/// (`timestep_spacing`; Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    fn from_config(cfg: &SchedulerConfig, default: &str) -> Result<Self, LoadError> {
        Ok(
            match cfg
                .choice(
                    "timestep_spacing",
                    default,
                    &["linspace", "leading", "trailing"],
                )?
                .as_str()
            {
                "linspace" => Spacing::Linspace,
                "leading" => Spacing::Leading,
                _ => Spacing::Trailing,
            },
        )
    }
}

/// One diffusers scheduler class. [`Scheduler`] checks the arguments
/// (lengths, step order, noise) before calling in, so implementations may
/// index freely.
trait Algorithm: Send + Sync {
    fn num_train_timesteps(&self) -> usize;
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;
    fn timesteps(&self) -> &[f64];
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    fn scale_model_input(&self, sample: &[f32], _step: usize) -> Vec<f32> {
        sample.to_vec()
    }
    /// Whether diffusers draws noise in this step.
    fn needs_noise(&self, _step: usize) -> bool {
        false
    }
    /// The divisor of [`Algorithm::scale_model_input`] (where it divides).
    fn input_divisor(&self, _step: usize) -> f32 {
        1.0
    }
    /// The step's update as a program; the multistep schedulers advance
    /// their scalar state (warm-up order, last order) here, once per step.
    fn step_program(&mut self, step: usize) -> StepProgram;
    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>>;
}

fn argument(message: impl Into<String>) -> EngineError {
    EngineError::Argument {
        op: "scheduler",
        message: message.into(),
    }
}

/// A configured scheduler: a small state machine driven by `set_timesteps`
/// and one `step` per timestep, in order.
pub struct Scheduler {
    kind: SchedulerKind,
    algorithm: Box<dyn Algorithm>,
    /// The step index `step` expects next; `None` right after
    /// `set_timesteps`, when any start index is allowed (image-to-video
    /// starts part-way).
    next_step: Option<usize>,
    /// What the multistep schedulers' steps kept for later ones, by slot:
    /// on the CPU for [`Scheduler::step`], on the GPU for
    /// [`Scheduler::run_step`].
    host_state: Vec<Option<Vec<f32>>>,
    device_state: Vec<Option<Tensor>>,
}

impl Scheduler {
    /// Builds the scheduler named by `kind`, or by the config's
    /// `_class_name` when `kind` is `None`, as diffusers'
    /// `Kind.from_config(config)` would. `karras` overrides the config's
    /// `use_karras_sigmas` (Euler and DPM-Solver++ only).
    pub fn new(
        config: &SchedulerConfig,
        kind: Option<SchedulerKind>,
        karras: Option<bool>,
    ) -> Result<Self> {
        Self::with_options(
            config,
            SchedulerOptions {
                kind,
                karras,
                shift: None,
            },
        )
    }

    /// As [`Scheduler::new`], with every override: a named kind is resolved
    /// against the config by [`SchedulerKind::for_config`] (`euler` on a
    /// flow-matching model is flow-matching Euler), and `shift` replaces
    /// the config's flow shift.
    pub fn with_options(config: &SchedulerConfig, options: SchedulerOptions) -> Result<Self> {
        let SchedulerOptions {
            kind,
            karras,
            shift,
        } = options;
        let kind = match kind {
            Some(k) => k.for_config(config)?,
            None => {
                let class = config.class_name().ok_or_else(|| {
                    config.error(
                        "no `_class_name`: name the scheduler to use (ddim, euler, euler-a, dpm++2m, lcm; \
                         unipc or euler for flow-matching models)",
                    )
                })?;
                SchedulerKind::from_class_name(class).ok_or_else(|| {
                    config.error(format!(
                        "`_class_name` is \"{class}\", which Motif does not implement (supported: {}); \
                         choose one of ddim, euler, euler-a, dpm++2m, lcm instead \
                         (unipc or euler for flow-matching models)",
                        SchedulerKind::ALL.map(|k| k.class_name()).join(", ")
                    ))
                })?
            }
        };
        if karras == Some(true) && !kind.supports_karras() {
            return Err(argument(format!(
                "Karras sigmas apply to euler and dpm++2m, not to {kind}"
            )));
        }
        if let Some(shift) = shift {
            if !kind.is_flow_matching() {
                return Err(argument(format!(
                    "shift {shift}: the shift applies to flow-matching samplers (unipc, flow-euler), not to {kind}"
                )));
            }
        }
        let algorithm: Box<dyn Algorithm> = match kind {
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(config, karras)?),
            SchedulerKind::EulerAncestral => {
                Box::new(euler_ancestral::EulerAncestral::new(config)?)
            }
            SchedulerKind::DpmPp2m => {
                Box::new(dpm_solver::DpmSolverMultistep::new(config, karras)?)
            }
            SchedulerKind::Lcm => Box::new(lcm::Lcm::new(config)?),
            SchedulerKind::UniPc => Box::new(unipc::UniPc::new(config, shift)?),
            SchedulerKind::FlowMatchEuler => {
                Box::new(flow_match_euler::FlowMatchEuler::new(config, shift)?)
            }
        };
        Ok(Self {
            kind,
            algorithm,
            next_step: None,
            host_state: Vec::new(),
            device_state: Vec::new(),
        })
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// Sets the number of denoising steps and resets the step state. Errors
    /// for 0 and for more steps than the model was trained with.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.algorithm.num_train_timesteps();
        if steps == 0 || steps > train {
            return Err(argument(format!(
                "{steps} inference steps: expected 1 to {train} (num_train_timesteps)"
            )));
        }
        self.algorithm.set_timesteps(steps)?;
        self.next_step = None;
        self.host_state.clear();
        self.device_state.clear();
        Ok(())
    }

    /// For image-to-video with `strength` in (0, 1]: sets `steps` timesteps
    /// and returns the index of the first one to run, as diffusers'
    /// AnimateDiff video-to-video pipeline does (`get_timesteps`: the last
    /// ⌊steps·strength⌋ steps). Add noise at `timesteps()[start]`.
    pub fn set_timesteps_for_strength(&mut self, steps: usize, strength: f64) -> Result<usize> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(argument(format!(
                "strength {strength}: expected a value in (0, 1]"
            )));
        }
        self.set_timesteps(steps)?;
        let init = ((steps as f64 * strength) as usize).min(steps);
        let start = steps - init;
        if start >= self.timesteps().len() {
            return Err(argument(format!(
                "strength {strength} with {steps} steps leaves no denoising step"
            )));
        }
        Ok(start)
    }

    /// The timesteps to pass to the UNet, one per step.
    pub fn timesteps(&self) -> &[f64] {
        self.algorithm.timesteps()
    }

    /// Whether the model gets the timesteps as integers (I64: DDIM,
    /// DPM-Solver, LCM, UniPC — whose flow timesteps are σ·1000 truncated)
    /// or as fractional floats (F32: Euler, e.g. 499.5; flow-matching Euler,
    /// σ·1000).
    pub fn timesteps_are_integer(&self) -> bool {
        !matches!(
            self.kind,
            SchedulerKind::Euler | SchedulerKind::EulerAncestral | SchedulerKind::FlowMatchEuler
        )
    }

    /// The noise levels σ, one per timestep plus the final one, for the
    /// schedulers that have them (Euler, Euler ancestral, DPM-Solver, and
    /// the flow-matching ones, whose σ is the flow time in [0, 1]).
    pub fn sigmas(&self) -> Option<&[f32]> {
        self.algorithm.sigmas()
    }

    /// What the initial unit-variance noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.algorithm.init_noise_sigma()
    }

    /// The UNet's input at step `step` (Euler: x/√(σ²+1); others: x).
    pub fn scale_model_input(&self, sample: &[f32], step: usize) -> Result<Vec<f32>> {
        self.check_index(step)?;
        Ok(self.algorithm.scale_model_input(sample, step))
    }

    /// Whether `step` takes noise at this step: diffusers draws a fresh
    /// standard normal sample of the latents' shape in every Euler ancestral
    /// step and in every LCM step but the last.
    pub fn needs_noise(&self, step: usize) -> bool {
        step < self.timesteps().len() && self.algorithm.needs_noise(step)
    }

    /// One denoising step: from the model's prediction at `timesteps()[step]`
    /// and the current latents to the next latents. Steps run in order; the
    /// first after `set_timesteps` may start anywhere.
    pub fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<StepOutput> {
        self.check_index(step)?;
        self.check_order(step)?;
        check_len("model_output", model_output.len(), sample.len())?;
        match noise {
            Some(noise) => check_len("noise", noise.len(), sample.len())?,
            None if self.algorithm.needs_noise(step) => return Err(missing_noise(self.kind, step)),
            None => {}
        }
        let program = self.algorithm.step_program(step);
        self.next_step = Some(step + 1);
        let mut inputs = vec![sample, model_output];
        if program.reads_noise() {
            inputs.push(noise.ok_or_else(|| missing_noise(self.kind, step))?);
        }
        for &slot in &program.state_inputs {
            let kept = self.host_state.get(slot).and_then(Option::as_deref);
            inputs.push(kept.ok_or_else(|| missing_state(self.kind, step, "step"))?);
        }
        let mut outputs = run_program_reference(&program.program, &inputs);
        for &(output, slot) in &program.keeps {
            if self.host_state.len() <= slot {
                self.host_state.resize(slot + 1, None);
            }
            self.host_state[slot] = Some(outputs[output].clone());
        }
        outputs.truncate(program.caller_outputs());
        let mut outputs = outputs.into_iter();
        Ok(StepOutput {
            prev_sample: outputs.next().unwrap_or_default(),
            pred_original: outputs.next().unwrap_or_default(),
            denoised: outputs.next(),
        })
    }

    /// Whether [`Scheduler::step_program`] gives programs: every kind does
    /// (the multistep ones keep their state where the steps run), so
    /// callers may keep their latents on the GPU whatever the kind.
    pub fn has_step_program(&self) -> bool {
        true
    }

    /// What [`Scheduler::scale_model_input`] divides the sample by at
    /// `step` (1 where it leaves it unchanged), for callers that scale on
    /// the GPU.
    pub fn input_divisor(&self, step: usize) -> Result<f32> {
        self.check_index(step)?;
        Ok(self.algorithm.input_divisor(step))
    }

    /// [`Scheduler::step`] as a per-element program for the caller to run
    /// where its latents are, with the same order checks: run it with
    /// [`Scheduler::run_step`], which keeps the multistep schedulers'
    /// state on the GPU.
    pub fn step_program(&mut self, step: usize) -> Result<StepProgram> {
        self.check_index(step)?;
        self.check_order(step)?;
        let program = self.algorithm.step_program(step);
        self.next_step = Some(step + 1);
        Ok(program)
    }

    /// Runs the step `program` from [`Scheduler::step_program`] on the GPU:
    /// `inputs` are the sample, the (guided) model output and, where the
    /// program reads it, the noise, all f32 of one size; the state earlier
    /// steps kept on the GPU is added, and what this step keeps stays
    /// there. Returns the next sample, `pred_original` and, where written,
    /// `denoised` (at [`StepProgram`]'s output indices), shaped as the
    /// sample.
    pub fn run_step(
        &mut self,
        gpu: &Gpu,
        program: &StepProgram,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>> {
        if inputs.len() != program.caller_inputs() {
            return Err(argument(format!(
                "the step reads {} inputs (sample, model output{}), {} given",
                program.caller_inputs(),
                if program.reads_noise() { ", noise" } else { "" },
                inputs.len()
            )));
        }
        let mut all = inputs.to_vec();
        for &slot in &program.state_inputs {
            let kept = self.device_state.get(slot).and_then(Option::as_ref);
            let step = self.next_step.map_or(0, |next| next - 1);
            all.push(kept.ok_or_else(|| missing_state(self.kind, step, "run_step"))?);
        }
        let mut outputs = run_program(gpu, &program.program, &all)?;
        for &(output, slot) in &program.keeps {
            if self.device_state.len() <= slot {
                self.device_state.resize(slot + 1, None);
            }
            self.device_state[slot] = Some(outputs[output].clone());
        }
        outputs.truncate(program.caller_outputs());
        Ok(outputs)
    }

    fn check_order(&self, step: usize) -> Result<()> {
        if let Some(expected) = self.next_step {
            if step != expected {
                return Err(argument(format!(
                    "step {step} called after step {}: steps must run in order (call set_timesteps to restart)",
                    expected - 1
                )));
            }
        }
        Ok(())
    }

    /// Noises clean latents to the level of `timestep` (image-to-video), as
    /// diffusers' `add_noise`. DDIM and LCM take any training timestep; the
    /// σ-based schedulers need one of `timesteps()`.
    pub fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        check_len("noise", noise.len(), original.len())?;
        self.algorithm.add_noise(original, noise, timestep)
    }

    /// The scales (a, b) of [`Scheduler::add_noise`] at `timestep`: every
    /// kind's `add_noise` computes `a·x₀ + b·ε`, in that order of f32
    /// operations or one equal to it bit for bit (a product by 1 is exact,
    /// f32 sums and products commute), so that callers may noise latents
    /// where they are.
    pub fn noise_scales(&self, timestep: f64) -> Result<(f32, f32)> {
        let a = self.algorithm.add_noise(&[1.0], &[0.0], timestep)?[0];
        let b = self.algorithm.add_noise(&[0.0], &[1.0], timestep)?[0];
        Ok((a, b))
    }

    /// [`Scheduler::add_noise`] at `timestep` as a program: inputs 0 the
    /// clean latents, 1 the noise; output 0 the noised latents.
    pub fn add_noise_program(&self, timestep: f64) -> Result<ElementProgram> {
        let (a, b) = self.noise_scales(timestep)?;
        let mut p = ElementProgram::new();
        let (x, noise) = (p.input(0), p.input(1));
        let noised = program_axpby(&mut p, a, x, b, noise);
        p.store(0, noised);
        Ok(p)
    }

    fn check_index(&self, step: usize) -> Result<()> {
        let n = self.timesteps().len();
        if n == 0 {
            return Err(argument("call set_timesteps before stepping"));
        }
        if step >= n {
            return Err(argument(format!(
                "step {step} out of range: the schedule has {n} steps"
            )));
        }
        Ok(())
    }
}

fn missing_noise(kind: SchedulerKind, step: usize) -> EngineError {
    argument(format!(
        "{kind} draws noise at step {step}, but no noise was given"
    ))
}

/// A multistep step whose earlier steps did not run where this one does
/// (a bug in the caller: every step of a run goes through `step`, or
/// every one through `run_step`).
fn missing_state(kind: SchedulerKind, step: usize, how: &str) -> EngineError {
    argument(format!(
        "{kind} step {step} reads what its earlier steps kept, but they did not run through \
         `{how}`: run every step of a schedule the same way"
    ))
}

fn check_len(what: &str, found: usize, expected: usize) -> Result<()> {
    if found != expected {
        return Err(EngineError::Shape {
            op: "scheduler step",
            expected: format!("{what} of {expected} values (the sample's length)"),
            found: format!("{found} values"),
        });
    }
    Ok(())
}

/// The index of `timestep` in `schedule` as diffusers' `index_for_timestep`
/// finds it: the second match where it occurs twice (so that a schedule
/// starting part-way does not skip a σ), `None` where it does not occur.
fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let mut matches = schedule
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// ᾱ at an integer training timestep, for DDIM's and LCM's `add_noise`.
fn alpha_cumprod_at(alphas_cumprod: &[f32], timestep: f64) -> Result<f32> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= alphas_cumprod.len() as f64 {
        return Err(argument(format!(
            "timestep {timestep}: expected an integer in 0..{}",
            alphas_cumprod.len()
        )));
    }
    Ok(alphas_cumprod[timestep as usize])
}

/// √ᾱ·x₀ + √(1−ᾱ)·ε, the forward process at ᾱ, in float32.
fn noise_to_alpha(original: &[f32], noise: &[f32], alpha_cumprod: f32) -> Vec<f32> {
    let (a, b) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
    original
        .iter()
        .zip(noise)
        .map(|(&x, &n)| a * x + b * n)
        .collect()
}

/// (1 − σ)·x₀ + σ·ε at the σ of `timestep` (image-to-video). UniPC falls
/// back to the last step for a timestep not in the schedule, as diffusers'
/// `index_for_timestep` does (`fallback_last`); flow-matching Euler errors.
fn flow_add_noise(
    timesteps: &[f64],
    sigmas: &[f32],
    original: &[f32],
    noise: &[f32],
    timestep: f64,
    fallback_last: bool,
) -> Result<Vec<f32>> {
    if timesteps.is_empty() {
        return Err(argument("call set_timesteps before add_noise"));
    }
    let index = match index_for_timestep(timesteps, timestep) {
        Some(i) => i,
        None if fallback_last => timesteps.len() - 1,
        None => {
            return Err(argument(format!(
                "timestep {timestep} is not in the schedule (call set_timesteps and use one of timesteps())"
            )))
        }
    };
    let sigma = sigmas[index];
    let alpha = 1.0 - sigma;
    Ok(original
        .iter()
        .zip(noise)
        .map(|(&x, &n)| alpha * x + sigma * n)
        .collect())
}
