//! `motif discord`: setting up Motif's Discord app (docs/DISCORD.md).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use motif_engine::pipelines::Camera;
use motif_server::discord::commands;

#[derive(Subcommand, Debug)]
pub enum DiscordCommand {
    /// Register /create, /animate and /remix for the app, replacing its earlier list (safe to run again). Reads the bot token from MOTIF_DISCORD_BOT_TOKEN.
    Register(RegisterArgs),
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The app's Application ID (Developer Portal, General Information).
    #[arg(long, env = "MOTIF_DISCORD_APPLICATION_ID")]
    application_id: String,
    /// Register in this guild (server) only: commands appear at once there, where global ones can take up to an hour.
    #[arg(long, value_name = "GUILD_ID")]
    guild: Option<String>,
    /// Discord's REST API (another base only for tests and proxies).
    #[arg(long, env = "MOTIF_DISCORD_API_BASE", default_value = commands::DEFAULT_API_BASE)]
    api_base: String,
}

pub fn run(command: &DiscordCommand) -> Result<()> {
    match command {
        DiscordCommand::Register(args) => register(args),
    }
}

fn register(args: &RegisterArgs) -> Result<()> {
    // From the environment only: a flag would show in `ps` and shell history.
    let token = match std::env::var("MOTIF_DISCORD_BOT_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t,
        _ => bail!(
            "MOTIF_DISCORD_BOT_TOKEN is not set: the bot token from the Developer Portal \
             (Bot, Reset Token) is needed to register commands"
        ),
    };
    if args.application_id.is_empty() || !args.application_id.chars().all(|c| c.is_ascii_digit()) {
        bail!(
            "--application-id (MOTIF_DISCORD_APPLICATION_ID) must be the app's numeric id, found `{}`",
            args.application_id
        );
    }
    let styles: Vec<String> = crate::catalog::styles()?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let cameras: Vec<String> = Camera::ALL.iter().map(|c| c.name().to_string()).collect();
    let defs = commands::definitions(&styles, &cameras);
    let done = commands::register_blocking(
        &args.api_base,
        &args.application_id,
        token.trim(),
        args.guild.as_deref(),
        &defs,
    )?;
    let scope = match &args.guild {
        Some(g) => format!("guild {g}"),
        None => "all guilds (global; may take up to an hour to appear)".to_string(),
    };
    println!(
        "registered {} commands for {scope}: {}",
        done.commands,
        defs.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .map(|n| format!("/{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
