//! Motif as a Discord app: the interactions endpoint's request checks and
//! parsing (`verify`, `interaction`) and the slash commands with `motif
//! discord register` (`commands`).

pub mod commands;
pub mod interaction;
pub mod verify;
