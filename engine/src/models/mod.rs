//! Models built on the operator library. Struct and field names mirror the
//! diffusers/transformers module trees, so checkpoint keys map one to one.

pub mod clip;
pub mod nn;
pub mod resnet;
pub mod vae;
