//! The command line's shape: every subcommand, option and help text (clap derive). The
//! man pages and shell completions are generated from it.

use crate::daemon::state::DEFAULT_STATE_PATH;
use crate::rules::edit::AssignBy;
use crate::rules::DEFAULT_CONFIG_PATH;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "usbpass",
    version,
    about = "Keeps named USB devices attached to the right running libvirt VM",
    long_about = "usbpass matches USB devices against rules and hot-attaches them to the first \
                  running VM each rule names, across replugs, VM restarts and libvirtd restarts.\n\n\
                  DEVICE may be vid:pid (046d:c52b), bus:dev (1:5 or 001:005), a port path (1-2.3) \
                  or a serial."
)]
pub struct Cli {
    /// The rules file.
    #[arg(long, global = true, value_name = "PATH", env = "USBPASS_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The daemon's state file.
    #[arg(long, global = true, value_name = "PATH", env = "USBPASS_STATE", default_value = DEFAULT_STATE_PATH)]
    pub state: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground; logs go to stderr.
    Daemon,
    /// Present USB devices, their matching rule, and where each one is now.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Each rule and the devices it matches now.
    Rules {
        #[arg(long)]
        json: bool,
    },
    /// The daemon's state and whether libvirt answers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Explain where DEVICE is and why: each rule's verdict, the target VMs, who holds
    /// it, the daemon's last error about it, host drivers, and the wrapper's settings.
    Why {
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Move every device of GROUP (rules with `group = "GROUP"`) to a VM at once:
    /// TARGET is a VM of the group, `host`, or `next` (the group's next VM); `--rules`
    /// hands the group back to its rules. Asks the running daemon, and waits until
    /// every device is in place.
    Switch {
        group: String,
        #[arg(required_unless_present = "rules", conflicts_with = "rules")]
        target: Option<String>,
        /// Hand the group back to its rules.
        #[arg(long)]
        rules: bool,
        /// Seconds to wait for every device to be in place.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Validate the rules file; exits non-zero on error.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Add or update a rule so DEVICE goes to VM; the daemon picks it up.
    Assign {
        device: String,
        vm: String,
        /// What the rule matches on.
        #[arg(long, value_enum, default_value = "id")]
        by: AssignBy,
    },
    /// Remove the rule named TARGET, or the rule that matches the device TARGET.
    Unassign { target: String },
    /// Attach DEVICE to VM now, once (not a rule; the daemon leaves it in place).
    Attach {
        device: String,
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Detach DEVICE (or the hostdev with alias ua-usbpass-...) from whichever VM holds it
    /// through usbpass.
    Detach {
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Reset DEVICE on the host (a USB port reset, the usual remedy for a wedged device).
    /// Refused for a device a running VM holds, unless --force.
    Reset {
        device: String,
        /// Reset it even when a running VM holds it (or libvirt cannot tell), or it is a
        /// hub.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or with --dir write one page per subcommand there.
    Man {
        /// Write usbpass.1 and usbpass-SUBCOMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print udev rules that let QEMU reopen the devices the rules name (for usbpass-qemu).
    UdevRules {
        /// The group QEMU runs as (`group =` in /etc/libvirt/qemu.conf).
        #[arg(long, default_value = crate::wrapper::udev_rules::DEFAULT_QEMU_GROUP)]
        group: String,
        /// Also make this user the owner of the device nodes.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Print the default rules file.
    DefaultConfig,
}
