//! diffusers `UNetMotionModel`: an SD UNet (`UNet2DConditionModel`) with
//! AnimateDiff motion modules after every spatial block. It loads from a
//! folder whose `unet/` holds the merged model, or from an SD `unet/` plus a
//! `motion_adapter/` folder (their keys do not overlap, so one key space
//! holds both). Structure comes from the configs; nothing assumes SD1.5's
//! sizes.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

pub use super::attention::MotionOptions;
use super::attention::{MotionModule, Transformer2DModel};
use super::nn::{Conv2d, GroupNorm, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::Gpu;
use crate::ops::{self, embedding::TimestepEmbedding, layout, Activation};
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, WeightSet, Weights};

/// An int or a per-block list, as diffusers configs allow.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone(); n],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

// diffusers' `__init__` defaults of `UNet2DConditionModel`, `UNetMotionModel`
// and `MotionAdapter`, used where a config leaves a key out. The two UNet
// classes agree on every default read here (their block type names differ,
// their structure does not).
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f32 {
    1.0
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f32 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_two_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_seq() -> usize {
    32
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// `unet/config.json`: a `UNet2DConditionModel` or a merged `UNetMotionModel`.
///
/// `flip_sin_to_cos` and `freq_shift` are not read: diffusers' AnimateDiff
/// always runs a `UNetMotionModel`, whose time projection is fixed
/// (`Timesteps(C, True, 0)`) whatever the file says, and `from_unet2d` drops
/// those keys from an SD UNet's config.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigFile {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_two_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f32,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f32,
    #[serde(default = "d_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Legacy naming in SD configs: the number of heads (8 when absent).
    /// `UNetMotionModel` has no such argument and ignores it.
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock<usize>>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    // Read from merged UNetMotionModel configs (their defaults are applied
    // in `resolve`, where the class is known).
    #[serde(default)]
    pub motion_num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub motion_max_seq_length: Option<usize>,
    #[serde(default)]
    pub use_motion_mid_block: Option<bool>,
    #[serde(default)]
    pub temporal_transformer_layers_per_block: Option<PerBlock<usize>>,
    #[serde(default)]
    pub temporal_transformer_layers_per_mid_block: Option<usize>,
    /// `None`: transformer_layers_per_block of the last level (diffusers).
    #[serde(default)]
    pub transformer_layers_per_mid_block: Option<usize>,
    #[serde(default)]
    pub mid_block_layers: Option<usize>,
    // Asymmetric up blocks (`UNetMotionModel`): not implemented, refused
    // when set rather than built symmetric.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub reverse_temporal_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub reverse_motion_num_attention_heads: Option<serde_json::Value>,
}

/// `motion_adapter/config.json` (diffusers `MotionAdapter`).
#[derive(Debug, Clone, Deserialize)]
pub struct MotionAdapterConfig {
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_two_layers")]
    pub motion_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_layers")]
    pub motion_transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub motion_mid_block_layers_per_block: usize,
    #[serde(default = "d_one")]
    pub motion_transformer_layers_per_mid_block: usize,
    #[serde(default = "d_heads")]
    pub motion_num_attention_heads: PerBlock<usize>,
    #[serde(default = "d_seq")]
    pub motion_max_seq_length: usize,
    #[serde(default = "d_true")]
    pub use_motion_mid_block: bool,
    #[serde(default)]
    pub conv_in_channels: Option<usize>,
}

/// The resolved structure, one entry per down block.
#[derive(Debug, Clone)]
pub struct UNetMotionConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// true: CrossAttn block (resnet, transformer, motion); false: resnet, motion.
    pub cross_attention: Vec<bool>,
    pub up_cross_attention: Vec<bool>,
    pub layers_per_block: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    /// Transformer layers in each of the mid block's attentions.
    pub mid_transformer_layers: usize,
    pub heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub motion_heads: Vec<usize>,
    pub motion_layers: Vec<usize>,
    pub motion_mid_layers: usize,
    pub motion_max_seq_length: usize,
    pub use_motion_mid_block: bool,
    pub mid_block_layers: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f32,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
}

impl UNetMotionConfig {
    /// Resolves `unet/config.json`, with `adapter` for a plain SD UNet (as
    /// diffusers' `UNetMotionModel.from_unet2d` does).
    pub fn resolve(
        unet_path: &Path,
        unet: &UNetConfigFile,
        adapter: Option<(&Path, &MotionAdapterConfig)>,
    ) -> Result<Self, LoadError> {
        let bad = |path: &Path, message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        let n = unet.block_out_channels.len();
        if n == 0 || unet.down_block_types.len() != n || unet.up_block_types.len() != n {
            return Err(bad(
                unet_path,
                format!(
                    "{} down and {} up block types for {n} block_out_channels",
                    unet.down_block_types.len(),
                    unet.up_block_types.len()
                ),
            ));
        }
        for (what, v) in [
            (
                "time_cond_proj_dim",
                unet.time_cond_proj_dim.map(|v| v.to_string()),
            ),
            ("addition_embed_type", unet.addition_embed_type.clone()),
            ("class_embed_type", unet.class_embed_type.clone()),
            ("encoder_hid_dim_type", unet.encoder_hid_dim_type.clone()),
        ] {
            if let Some(v) = v {
                return Err(bad(
                    unet_path,
                    format!("{what} = {v} is not supported (SD1.x-style UNets only)"),
                ));
            }
        }
        if unet
            .resnet_time_scale_shift
            .as_deref()
            .is_some_and(|s| s != "default")
        {
            return Err(bad(
                unet_path,
                "resnet_time_scale_shift other than \"default\" is not supported".into(),
            ));
        }
        if unet.act_fn != "silu" {
            return Err(bad(
                unet_path,
                format!("act_fn `{}` is not supported (silu)", unet.act_fn),
            ));
        }
        let cross = |types: &[String], path: &Path| -> Result<Vec<bool>, LoadError> {
            types
                .iter()
                .map(|t| match t.as_str() {
                    "CrossAttnDownBlock2D"
                    | "CrossAttnDownBlockMotion"
                    | "CrossAttnUpBlock2D"
                    | "CrossAttnUpBlockMotion" => Ok(true),
                    "DownBlock2D" | "DownBlockMotion" | "UpBlock2D" | "UpBlockMotion" => Ok(false),
                    other => Err(bad(path, format!("block type `{other}` is not supported"))),
                })
                .collect()
        };
        let merged = unet.class_name.as_deref() == Some("UNetMotionModel");
        for (key, value) in [
            (
                "reverse_transformer_layers_per_block",
                &unet.reverse_transformer_layers_per_block,
            ),
            (
                "reverse_temporal_transformer_layers_per_block",
                &unet.reverse_temporal_transformer_layers_per_block,
            ),
            (
                "reverse_motion_num_attention_heads",
                &unet.reverse_motion_num_attention_heads,
            ),
        ] {
            if let (true, Some(v)) = (merged, value) {
                return Err(bad(
                    unet_path,
                    format!("{key} = {v} (asymmetric up blocks) is not supported"),
                ));
            }
        }
        // UNet2DConditionModel reads `num_attention_heads or
        // attention_head_dim` (the legacy name, default 8), and from_unet2d
        // carries that over; a merged UNetMotionModel knows only
        // `num_attention_heads` (default 8).
        let heads = match (&unet.num_attention_heads, &unet.attention_head_dim, merged) {
            (Some(h), _, _) => h.expand(n),
            (None, Some(h), false) => h.expand(n),
            (None, _, _) => vec![8; n],
        };
        let (motion_heads, motion_layers, motion_mid_layers, max_seq, use_mid, layers_per_block, mid_block_layers) = match (merged, adapter) {
            (true, _) => (
                unet.motion_num_attention_heads.clone().unwrap_or(PerBlock::One(8)).expand(n),
                unet.temporal_transformer_layers_per_block.clone().unwrap_or(PerBlock::One(1)).expand(n),
                unet.temporal_transformer_layers_per_mid_block.unwrap_or(1),
                unet.motion_max_seq_length.unwrap_or(32),
                unet.use_motion_mid_block.unwrap_or(true),
                unet.layers_per_block.expand(n),
                unet.mid_block_layers.unwrap_or(1),
            ),
            (false, Some((apath, a))) => {
                if a.block_out_channels.len() != n {
                    return Err(bad(apath, format!(
                        "the motion adapter has {} blocks but the UNet has {n}",
                        a.block_out_channels.len()
                    )));
                }
                if a.motion_layers_per_block.expand(n) != unet.layers_per_block.expand(n) {
                    return Err(bad(apath, "motion_layers_per_block differs from the UNet's layers_per_block".into()));
                }
                if a.conv_in_channels.is_some() {
                    return Err(bad(apath, "conv_in_channels (PIA adapters) is not supported".into()));
                }
                (
                    a.motion_num_attention_heads.expand(n),
                    a.motion_transformer_layers_per_block.expand(n),
                    a.motion_transformer_layers_per_mid_block,
                    a.motion_max_seq_length,
                    a.use_motion_mid_block,
                    a.motion_layers_per_block.expand(n),
                    1,
                )
            }
            (false, None) => {
                return Err(bad(unet_path, "this is a plain SD UNet: a motion adapter is needed (a `motion_adapter/` folder or --motion-adapter DIR)".into()))
            }
        };
        let cfg = UNetMotionConfig {
            in_channels: unet.in_channels,
            out_channels: unet.out_channels,
            block_out_channels: unet.block_out_channels.clone(),
            cross_attention: cross(&unet.down_block_types, unet_path)?,
            up_cross_attention: cross(&unet.up_block_types, unet_path)?,
            layers_per_block,
            transformer_layers: unet.transformer_layers_per_block.expand(n),
            // An SD UNet's config has no such key (from_unet2d carries none).
            mid_transformer_layers: match (merged, unet.transformer_layers_per_mid_block) {
                (true, Some(layers)) => layers,
                _ => unet
                    .transformer_layers_per_block
                    .expand(n)
                    .last()
                    .copied()
                    .unwrap_or(1),
            },
            heads,
            cross_attention_dim: unet.cross_attention_dim.expand(n),
            motion_heads,
            motion_layers,
            motion_mid_layers,
            motion_max_seq_length: max_seq,
            use_motion_mid_block: use_mid,
            mid_block_layers,
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            use_linear_projection: unet.use_linear_projection,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
        };
        for (name, v) in [
            ("layers_per_block", &cfg.layers_per_block),
            ("transformer_layers_per_block", &cfg.transformer_layers),
            ("attention heads", &cfg.heads),
            ("cross_attention_dim", &cfg.cross_attention_dim),
            ("motion heads", &cfg.motion_heads),
            ("motion layers", &cfg.motion_layers),
        ] {
            if v.len() != n {
                return Err(bad(
                    unet_path,
                    format!("{name} lists {} values for {n} blocks", v.len()),
                ));
            }
        }
        for (i, &c) in cfg.block_out_channels.iter().enumerate() {
            if c % cfg.norm_num_groups != 0
                || cfg.heads[i] == 0
                || c % cfg.heads[i] != 0
                || cfg.motion_heads[i] == 0
                || c % cfg.motion_heads[i] != 0
            {
                return Err(bad(unet_path, format!(
                    "block {i}: {c} channels do not divide into {} groups, {} heads and {} motion heads",
                    cfg.norm_num_groups, cfg.heads[i], cfg.motion_heads[i]
                )));
            }
        }
        Ok(cfg)
    }
}

/// One level of the UNet: resnets, spatial transformers (CrossAttn blocks)
/// and motion modules, then the down- or upsampler.
pub struct MotionBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub motion_modules: Vec<MotionModule>,
    pub sampler: Option<Conv2d>,
}

pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub motion_modules: Vec<MotionModule>,
}

pub struct UNetMotionModel {
    pub config: UNetMotionConfig,
    pub conv_in: Conv2d,
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    pub down_blocks: Vec<MotionBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<MotionBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNetMotionModel {
    /// Loads `unet_dir` (merged, or plain SD with `adapter_dir`).
    pub fn load(gpu: &Gpu, unet_dir: &Path, adapter_dir: Option<&Path>) -> Result<Self> {
        let unet_cfg_path = unet_dir.join("config.json");
        let unet_cfg: UNetConfigFile = read_config(&unet_cfg_path)?;
        let merged = unet_cfg.class_name.as_deref() == Some("UNetMotionModel");
        let adapter = match (merged, adapter_dir) {
            (false, Some(dir)) => {
                let path = dir.join("config.json");
                let cfg: MotionAdapterConfig = read_config(&path)?;
                Some((path, cfg))
            }
            _ => None,
        };
        let config = UNetMotionConfig::resolve(
            &unet_cfg_path,
            &unet_cfg,
            adapter.as_ref().map(|(p, c)| (p.as_path(), c)),
        )?;
        let mut files = crate::weights::safetensors_files(unet_dir)?;
        if let (false, Some(dir)) = (merged, adapter_dir) {
            files.extend(crate::weights::safetensors_files(dir)?);
        }
        let weights = Weights::new(Arc::new(WeightSet::open(&files)?), gpu.precision());
        Self::new(gpu, &weights, config)
    }

    pub fn new(gpu: &Gpu, w: &Weights, config: UNetMotionConfig) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let groups = c.norm_num_groups;
        let rc = |cin, cout, scale| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(temb),
            groups,
            eps: c.norm_eps,
            output_scale_factor: scale,
        };
        let motion = |w: &Weights, channels, i: usize, layers| {
            MotionModule::new(
                gpu,
                w,
                channels,
                c.motion_heads[i],
                layers,
                groups,
                c.motion_max_seq_length,
            )
        };
        let transformer = |w: &Weights, channels, heads, layers, cross| {
            Transformer2DModel::new(
                gpu,
                w,
                channels,
                heads,
                layers,
                cross,
                groups,
                c.use_linear_projection,
            )
        };

        let mut down_blocks = Vec::new();
        for i in 0..n {
            let b = w.pp("down_blocks").pp(i);
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let mut block = MotionBlock {
                resnets: vec![],
                attentions: vec![],
                motion_modules: vec![],
                sampler: None,
            };
            for j in 0..c.layers_per_block[i] {
                block.resnets.push(ResnetBlock2D::new(
                    gpu,
                    &b.pp("resnets").pp(j),
                    &rc(if j == 0 { cin } else { ch[i] }, ch[i], 1.0),
                )?);
                if c.cross_attention[i] {
                    block.attentions.push(transformer(
                        &b.pp("attentions").pp(j),
                        ch[i],
                        c.heads[i],
                        c.transformer_layers[i],
                        c.cross_attention_dim[i],
                    )?);
                }
                block.motion_modules.push(motion(
                    &b.pp("motion_modules").pp(j),
                    ch[i],
                    i,
                    c.motion_layers[i],
                )?);
            }
            if i + 1 < n {
                block.sampler = Some(Conv2d::new(
                    gpu,
                    &b.pp("downsamplers").pp(0).pp("conv"),
                    ch[i],
                    ch[i],
                    3,
                    2,
                    c.downsample_padding,
                )?);
            }
            down_blocks.push(block);
        }

        let top = ch[n - 1];
        let m = w.pp("mid_block");
        let mut mid_block = MidBlock {
            resnets: vec![],
            attentions: vec![],
            motion_modules: vec![],
        };
        mid_block.resnets.push(ResnetBlock2D::new(
            gpu,
            &m.pp("resnets").pp(0),
            &rc(top, top, c.mid_block_scale_factor),
        )?);
        for j in 0..c.mid_block_layers {
            mid_block.attentions.push(transformer(
                &m.pp("attentions").pp(j),
                top,
                c.heads[n - 1],
                c.mid_transformer_layers,
                c.cross_attention_dim[n - 1],
            )?);
            if c.use_motion_mid_block {
                mid_block.motion_modules.push(motion(
                    &m.pp("motion_modules").pp(j),
                    top,
                    n - 1,
                    c.motion_mid_layers,
                )?);
            }
            mid_block.resnets.push(ResnetBlock2D::new(
                gpu,
                &m.pp("resnets").pp(j + 1),
                &rc(top, top, c.mid_block_scale_factor),
            )?);
        }

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        for i in 0..n {
            let b = w.pp("up_blocks").pp(i);
            let k = n - 1 - i; // the matching down level
            let prev = if i == 0 { rev[0] } else { rev[i - 1] };
            let skip_in = rev[(i + 1).min(n - 1)];
            let layers = c.layers_per_block[k] + 1;
            let mut block = MotionBlock {
                resnets: vec![],
                attentions: vec![],
                motion_modules: vec![],
                sampler: None,
            };
            for j in 0..layers {
                let res_skip = if j == layers - 1 { skip_in } else { rev[i] };
                let res_in = if j == 0 { prev } else { rev[i] };
                block.resnets.push(ResnetBlock2D::new(
                    gpu,
                    &b.pp("resnets").pp(j),
                    &rc(res_in + res_skip, rev[i], 1.0),
                )?);
                if c.up_cross_attention[i] {
                    block.attentions.push(transformer(
                        &b.pp("attentions").pp(j),
                        rev[i],
                        c.heads[k],
                        c.transformer_layers[k],
                        c.cross_attention_dim[k],
                    )?);
                }
                block.motion_modules.push(motion(
                    &b.pp("motion_modules").pp(j),
                    rev[i],
                    k,
                    c.motion_layers[k],
                )?);
            }
            if i + 1 < n {
                block.sampler = Some(Conv2d::new(
                    gpu,
                    &b.pp("upsamplers").pp(0).pp("conv"),
                    rev[i],
                    rev[i],
                    3,
                    1,
                    1,
                )?);
            }
            up_blocks.push(block);
        }

        let te = w.pp("time_embedding");
        Ok(UNetMotionModel {
            conv_in: Conv2d::new(gpu, &w.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_linear_1: Linear::new(gpu, &te.pp("linear_1"), ch[0], temb, true)?,
            time_linear_2: Linear::new(gpu, &te.pp("linear_2"), temb, temb, true)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(gpu, &w.pp("conv_norm_out"), groups, ch[0], c.norm_eps)?,
            conv_out: Conv2d::new(gpu, &w.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// The noise prediction for `sample` [B, C, F, H, W] at `timestep`
    /// (one value, or one per batch item; fractional values are allowed),
    /// with `encoder_hidden_states` [B·F, L, D] (already repeated per frame,
    /// batch-major, as diffusers' pipeline passes them); `options` steer
    /// the motion modules for this call only.
    pub fn forward(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        timestep: &[f32],
        encoder_hidden_states: &Tensor,
        options: &MotionOptions,
    ) -> Result<Tensor> {
        let c = &self.config;
        if sample.rank() != 5 || sample.shape()[1] != c.in_channels {
            return Err(EngineError::Shape {
                op: "unet",
                expected: format!("sample [B, {}, F, H, W]", c.in_channels),
                found: fmt_shape(sample.shape()),
            });
        }
        let (b, f) = (sample.shape()[0], sample.shape()[2]);
        if encoder_hidden_states.rank() != 3
            || encoder_hidden_states.shape()[0] != b * f
            || encoder_hidden_states.shape()[2] != c.cross_attention_dim[0]
        {
            return Err(EngineError::Shape {
                op: "unet",
                expected: format!(
                    "encoder_hidden_states [B·F = {}, L, {}]",
                    b * f,
                    c.cross_attention_dim[0]
                ),
                found: fmt_shape(encoder_hidden_states.shape()),
            });
        }
        if timestep.len() != 1 && timestep.len() != b {
            return Err(EngineError::Argument {
                op: "unet",
                message: format!("{} timesteps for a batch of {b}", timestep.len()),
            });
        }
        let windowed = options
            .context_windows
            .is_some_and(|(length, _)| length <= c.motion_max_seq_length && length <= f);
        if f > c.motion_max_seq_length && !windowed {
            return Err(EngineError::Argument {
                op: "unet",
                message: format!(
                    "{f} frames exceed the motion modules' {} (use context windows)",
                    c.motion_max_seq_length
                ),
            });
        }
        // Time embedding per batch item, repeated per frame (row = b·F + f).
        let per_row: Vec<f32> = (0..b * f)
            .map(|r| timestep[if timestep.len() == 1 { 0 } else { r / f }])
            .collect();
        let ts = TimestepEmbedding::new(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
        let t = ops::embedding::timestep_embedding(gpu, &per_row, &ts, gpu.precision())?;
        let emb = self.time_linear_2.forward(
            gpu,
            &self.time_linear_1.forward_act(gpu, &t, Activation::Silu)?,
        )?;
        // Every resnet applies SiLU before its time_emb_proj: do it once.
        let temb = ops::silu(gpu, &emb)?;
        let ctx = encoder_hidden_states;

        let mut h = self
            .conv_in
            .forward(gpu, &layout::video_to_frames(gpu, sample)?)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for j in 0..block.resnets.len() {
                h = block.resnets[j].forward(gpu, &h, Some(&temb))?;
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(gpu, &h, ctx)?;
                }
                h = block.motion_modules[j].forward(gpu, &h, f, options)?;
                skips.push(h.clone());
            }
            if let Some(down) = &block.sampler {
                h = down.forward(gpu, &h)?;
                skips.push(h.clone());
            }
        }

        let mid = &self.mid_block;
        h = mid.resnets[0].forward(gpu, &h, Some(&temb))?;
        for j in 0..mid.attentions.len() {
            h = mid.attentions[j].forward(gpu, &h, ctx)?;
            if let Some(m) = mid.motion_modules.get(j) {
                h = m.forward(gpu, &h, f, options)?;
            }
            h = mid.resnets[j + 1].forward(gpu, &h, Some(&temb))?;
        }

        for block in &self.up_blocks {
            for j in 0..block.resnets.len() {
                let skip = skips
                    .pop()
                    .expect("one skip per up-block resnet, as in diffusers");
                h = layout::concat(gpu, &[&h, &skip], 1)?;
                h = block.resnets[j].forward(gpu, &h, Some(&temb))?;
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(gpu, &h, ctx)?;
                }
                h = block.motion_modules[j].forward(gpu, &h, f, options)?;
            }
            if let Some(up) = &block.sampler {
                // Nearest upsampling to the next skip's exact size (2x unless
                // the latent size is not a multiple of the UNet's downsampling).
                let target = skips
                    .last()
                    .map(|s| (s.shape()[2], s.shape()[3]))
                    .unwrap_or((2 * h.shape()[2], 2 * h.shape()[3]));
                h = up.forward(gpu, &layout::upsample_nearest(gpu, &h, target.0, target.1)?)?;
            }
        }
        h = self.conv_norm_out.forward(gpu, &h, true)?;
        h = self.conv_out.forward(gpu, &h)?;
        layout::frames_to_video(gpu, &h, f)
    }
}
