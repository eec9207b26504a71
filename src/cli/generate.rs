//! The commands that print generated text: shell completions, man pages, udev rules for
//! the wrapper, and the default rules file.

use super::args::Cli;
use super::CliError;
use crate::rules::{Config, DEFAULT_CONFIG_TEXT};
use crate::wrapper::udev_rules::{render_udev_rules, QemuAccess};
use clap::CommandFactory;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode, CliError> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "usbpass",
        &mut std::io::stdout(),
    );
    Ok(ExitCode::SUCCESS)
}

/// One page on stdout, or with a directory one page per subcommand there.
pub fn man(dir: Option<PathBuf>) -> Result<ExitCode, CliError> {
    let Some(dir) = dir else {
        clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|source| CliError::WriteOutput { source })?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(&dir).map_err(|source| CliError::CreateManDirectory {
        dir: dir.clone(),
        source,
    })?;
    clap_mangen::generate_to(Cli::command(), &dir)
        .map_err(|source| CliError::WriteManPages { dir, source })?;
    Ok(ExitCode::SUCCESS)
}

pub fn udev_rules(
    config_path: &Path,
    group: String,
    owner: Option<String>,
) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    let access = QemuAccess { group, owner };
    print!("{}", render_udev_rules(&config, &access)?);
    Ok(ExitCode::SUCCESS)
}

pub fn default_config() -> Result<ExitCode, CliError> {
    print!("{DEFAULT_CONFIG_TEXT}");
    Ok(ExitCode::SUCCESS)
}
