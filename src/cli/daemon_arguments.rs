//! `usbpassd`'s command line: `--config PATH` and `--state PATH`, with the same
//! environment variables and defaults as `usbpass`. Parsed by hand: the daemon binary
//! leaves clap out to stay small.

use crate::daemon::state::DEFAULT_STATE_PATH;
use crate::rules::DEFAULT_CONFIG_PATH;
use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "usage: usbpassd [--config PATH] [--state PATH]\n\
    Runs the usbpass daemon in the foreground; logs go to stderr.\n  \
    --config PATH  the rules file [env: USBPASS_CONFIG] [default: /etc/usbpass/usbpass.toml]\n  \
    --state PATH   the daemon's state file [env: USBPASS_STATE] [default: /run/usbpass/state.json]";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum DaemonArguments {
    Run { config: PathBuf, state: PathBuf },
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DaemonArgumentsError {
    #[error("{option} needs a path after it")]
    MissingValue { option: &'static str },
    #[error("unknown argument '{argument}'")]
    UnknownArgument { argument: String },
}

/// Parses `arguments` (without the program name); `environment` reads a variable.
pub fn parse_daemon_arguments(
    arguments: impl IntoIterator<Item = OsString>,
    environment: impl Fn(&str) -> Option<OsString>,
) -> Result<DaemonArguments, DaemonArgumentsError> {
    let from_environment = |name: &str, default: &str| {
        environment(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let mut config = from_environment("USBPASS_CONFIG", DEFAULT_CONFIG_PATH);
    let mut state = from_environment("USBPASS_STATE", DEFAULT_STATE_PATH);
    let mut arguments = arguments.into_iter();
    while let Some(argument) = arguments.next() {
        let text = argument.to_string_lossy().into_owned();
        let (option, inline) = match text.split_once('=') {
            Some((option, value)) if option.starts_with("--") => {
                (option.to_string(), Some(OsString::from(value)))
            }
            _ => (text.clone(), None),
        };
        let slot = match option.as_str() {
            "-h" | "--help" => return Ok(DaemonArguments::Help),
            "-V" | "--version" => return Ok(DaemonArguments::Version),
            "--config" => (&mut config, "--config"),
            "--state" => (&mut state, "--state"),
            _ => return Err(DaemonArgumentsError::UnknownArgument { argument: text }),
        };
        let value = match inline {
            Some(value) => value,
            None => arguments
                .next()
                .ok_or(DaemonArgumentsError::MissingValue { option: slot.1 })?,
        };
        if value.is_empty() {
            return Err(DaemonArgumentsError::MissingValue { option: slot.1 });
        }
        *slot.0 = PathBuf::from(value);
    }
    Ok(DaemonArguments::Run { config, state })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> Result<DaemonArguments, DaemonArgumentsError> {
        parse_daemon_arguments(arguments.iter().map(OsString::from), |_| None)
    }

    fn run(config: &str, state: &str) -> DaemonArguments {
        DaemonArguments::Run {
            config: config.into(),
            state: state.into(),
        }
    }

    #[test]
    fn defaults_are_usbpass_defaults() {
        assert_eq!(parse(&[]), Ok(run(DEFAULT_CONFIG_PATH, DEFAULT_STATE_PATH)));
    }

    #[test]
    fn both_spellings_of_an_option_and_the_last_one_wins() {
        assert_eq!(
            parse(&["--config", "/a.toml", "--state=/s.json", "--config=/b.toml"]),
            Ok(run("/b.toml", "/s.json"))
        );
    }

    #[test]
    fn environment_comes_before_the_default_and_after_the_option() {
        let environment = |name: &str| match name {
            "USBPASS_CONFIG" => Some(OsString::from("/env.toml")),
            _ => None,
        };
        assert_eq!(
            parse_daemon_arguments(Vec::<OsString>::new(), environment),
            Ok(run("/env.toml", DEFAULT_STATE_PATH))
        );
        assert_eq!(
            parse_daemon_arguments([OsString::from("--config=/cli.toml")], environment),
            Ok(run("/cli.toml", DEFAULT_STATE_PATH))
        );
    }

    #[test]
    fn usage_names_the_real_defaults() {
        assert!(USAGE.contains(DEFAULT_CONFIG_PATH) && USAGE.contains(DEFAULT_STATE_PATH));
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            parse(&["--config"]),
            Err(DaemonArgumentsError::MissingValue { option: "--config" })
        );
        assert_eq!(
            parse(&["--state="]),
            Err(DaemonArgumentsError::MissingValue { option: "--state" })
        );
        assert_eq!(
            parse(&["daemon"]).unwrap_err().to_string(),
            "unknown argument 'daemon'"
        );
        assert_eq!(parse(&["--help", "--bogus"]), Ok(DaemonArguments::Help));
    }
}
