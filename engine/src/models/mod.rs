//! Models built on the operator library. Struct and field names mirror the
//! diffusers/transformers module trees, so checkpoint keys map one to one.

pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod nn;
pub mod resnet;
pub mod source;
pub mod umt5;
pub mod unet_motion;
pub mod vae;
pub mod wan_files;
pub mod wan_transformer;
pub mod wan_vae;
