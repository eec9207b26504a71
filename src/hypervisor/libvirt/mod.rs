//! The real `Hypervisor`: libvirt through the `virt` crate. The only module that imports
//! `virt`. It opens the connection, feeds libvirt's events into the daemon's channel,
//! lists running domains with their USB hostdevs, and attaches and detaches hostdevs,
//! live only.

mod events;
pub mod failure;
mod node_device_events;
pub mod node_device_source;
pub mod node_devices;
pub mod usb_ports;
pub mod xml;

use xml::{build_usb_hostdev, parse_usb_hostdevs};

use crate::event::EventSender;
use crate::hypervisor::{
    Connector, DefinedHostdevs, DomainView, FailureKind, HostdevSpec, Hypervisor, HypervisorError,
    RunningDomains, UnreadableDomain, UsbHostdev,
};
use crate::model::alias::HostdevAlias;
use failure::LibvirtFailure;
use std::ffi::CString;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// Keepalive on remote connections: a probe every 5 s, given up after 3 unanswered, so a
/// dead remote host shows as a disconnect within about 20 s.
const KEEPALIVE_INTERVAL_SECONDS: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot start the libvirt event loop for {uri}: {message}")]
    StartEventLoop { uri: String, message: String },
    #[error("cannot connect to libvirt at {uri}: {}", failure.message)]
    Connect {
        uri: String,
        failure: LibvirtFailure,
        #[source]
        source: virt::error::Error,
    },
    #[error("cannot register for libvirt {callback} events at {uri}: {}", failure.message)]
    RegisterEvents {
        uri: String,
        callback: &'static str,
        failure: LibvirtFailure,
        #[source]
        source: virt::error::Error,
    },
    #[error("cannot enable keepalive on the libvirt connection to {uri}: {}", failure.message)]
    EnableKeepalive {
        uri: String,
        failure: LibvirtFailure,
        #[source]
        source: virt::error::Error,
    },
    #[error("libvirt at {uri} does not answer: {}", failure.message)]
    Probe {
        uri: String,
        failure: LibvirtFailure,
        #[source]
        source: virt::error::Error,
    },
}

impl LibvirtError {
    pub fn kind(&self) -> FailureKind {
        match self {
            LibvirtError::StartEventLoop { .. } => FailureKind::Other,
            LibvirtError::Connect { failure, .. }
            | LibvirtError::RegisterEvents { failure, .. }
            | LibvirtError::EnableKeepalive { failure, .. }
            | LibvirtError::Probe { failure, .. } => failure.kind(),
        }
    }
}

impl From<LibvirtError> for HypervisorError {
    /// The daemon's view: whatever stopped a connection from being made, said once
    /// (`HypervisorError::Connect` names the uri itself).
    fn from(error: LibvirtError) -> Self {
        let (uri, message) = match error {
            LibvirtError::StartEventLoop { uri, message } => (
                uri,
                format!("cannot start the libvirt event loop: {message}"),
            ),
            LibvirtError::Connect { uri, failure, .. }
            | LibvirtError::Probe { uri, failure, .. } => (uri, failure.message),
            LibvirtError::RegisterEvents {
                uri,
                callback,
                failure,
                ..
            } => (
                uri,
                format!("cannot register for {callback} events: {}", failure.message),
            ),
            LibvirtError::EnableKeepalive { uri, failure, .. } => {
                (uri, format!("cannot enable keepalive: {}", failure.message))
            }
        };
        HypervisorError::Connect { uri, message }
    }
}

/// An open libvirt connection with the daemon's callbacks registered on it.
pub struct LibvirtHypervisor {
    uri: String,
    // Field order is drop order: the callbacks are deregistered (and their senders freed
    // by libvirt) before the connection's last reference is closed.
    _registrations: events::Registrations,
    connection: Connect,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LibvirtHypervisor")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// Opens `uri` and sends every domain lifecycle, device-removed and connection-close
/// event into `events`. Cheap to call again after a disconnect: the event loop starts
/// once per process, and each call makes a fresh connection.
pub fn connect(uri: &str, events: EventSender) -> Result<LibvirtHypervisor, LibvirtError> {
    // libvirt prints every error to stderr by default; the daemon logs them itself.
    virt::error::clear_error_callback();
    // libvirt requires an event loop implementation before the connection is opened.
    events::ensure_event_loop().map_err(|message| LibvirtError::StartEventLoop {
        uri: uri.to_string(),
        message,
    })?;
    let connection = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
        uri: uri.to_string(),
        failure: LibvirtFailure::from_error(&source),
        source,
    })?;
    // Client keepalive only where it earns its wake-ups. Its timer makes the event
    // thread poll with a 5 s timeout instead of blocking, and the daemon must not wake
    // while idle. On a local unix socket the kernel reports a dead libvirtd as EOF at
    // once, so keepalive adds nothing there; across a network a silently dead peer is
    // only found by probing. (libvirtd's own keepalive, `keepalive_interval` in
    // libvirtd.conf, 5 s by default, still pings every client that runs an event loop;
    // libvirt answers those pings on its event thread without an `Event`.) Keepalive is
    // the remote driver's and would work on a unix socket too, but a local libvirtd that
    // hangs instead of dying is caught by the daemon's deadline on every call, which
    // costs no wake-up while idle.
    if !is_local_uri(uri) {
        connection
            .set_keep_alive(KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_COUNT)
            .map_err(|source| LibvirtError::EnableKeepalive {
                uri: uri.to_string(),
                failure: LibvirtFailure::from_error(&source),
                source,
            })?;
    }
    let registrations =
        events::register(&connection, &events).map_err(|error| LibvirtError::RegisterEvents {
            uri: uri.to_string(),
            callback: error.callback,
            failure: LibvirtFailure::from_error(&error.source),
            source: error.source,
        })?;
    Ok(LibvirtHypervisor {
        uri: uri.to_string(),
        _registrations: registrations,
        connection,
    })
}

/// The daemon's way to (re)open connections: `connect`, with its error in the daemon's
/// terms.
pub struct LibvirtConnector;

impl Connector for LibvirtConnector {
    type Hypervisor = LibvirtHypervisor;

    fn connect(
        &self,
        uri: &str,
        events: EventSender,
    ) -> Result<LibvirtHypervisor, HypervisorError> {
        Ok(connect(uri, events)?)
    }
}

/// Whether libvirt at `uri` answers, for `usbpass status`. Read-only, so it works for
/// users who may read but not change the host's domains; opens and closes its own
/// connection, and starts no event loop.
pub fn is_reachable(uri: &str) -> Result<(), LibvirtError> {
    virt::error::clear_error_callback();
    let connection =
        Connect::open_read_only(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            failure: LibvirtFailure::from_error(&source),
            source,
        })?;
    // Opening already made a round trip; asking the driver proves it is the hypervisor
    // driver and not only the daemon that answers.
    connection
        .hyp_version()
        .map_err(|source| LibvirtError::Probe {
            uri: uri.to_string(),
            failure: LibvirtFailure::from_error(&source),
            source,
        })?;
    Ok(())
}

/// The names of every domain defined at `uri`, running or not, sorted: for the CLI's
/// check that a rule names a VM libvirt knows. Read-only, like `is_reachable`.
pub fn defined_domain_names(uri: &str) -> Result<Vec<String>, LibvirtError> {
    virt::error::clear_error_callback();
    let connection =
        Connect::open_read_only(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            failure: LibvirtFailure::from_error(&source),
            source,
        })?;
    let domains = connection
        .list_all_domains(0)
        .map_err(|source| LibvirtError::Probe {
            uri: uri.to_string(),
            failure: LibvirtFailure::from_error(&source),
            source,
        })?;
    let mut names: Vec<String> = domains
        .iter()
        .filter_map(|domain| domain.name().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// One defined domain as `usbpass why` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DomainSummary {
    pub name: String,
    pub running: bool,
    /// For a running domain, its USB ports from the live XML.
    pub usb_ports: Option<usb_ports::UsbPortUsage>,
}

/// Every domain defined at `uri`, running or not, with the USB ports of those running.
/// Read-only, like `is_reachable`.
pub fn domain_summaries(uri: &str) -> Result<Vec<DomainSummary>, LibvirtError> {
    virt::error::clear_error_callback();
    let probe_error = |source: virt::error::Error| LibvirtError::Probe {
        uri: uri.to_string(),
        failure: LibvirtFailure::from_error(&source),
        source,
    };
    let connection =
        Connect::open_read_only(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            failure: LibvirtFailure::from_error(&source),
            source,
        })?;
    let mut summaries = Vec::new();
    for domain in connection.list_all_domains(0).map_err(probe_error)? {
        // A domain undefined since the listing is simply left out.
        let Ok(name) = domain.name() else { continue };
        let running = domain.is_active().unwrap_or(false);
        let usb_ports = if running {
            domain
                .xml_desc(0)
                .ok()
                .and_then(|xml| usb_ports::usb_port_usage(&xml).ok())
        } else {
            None
        };
        summaries.push(DomainSummary {
            name,
            running,
            usb_ports,
        });
    }
    summaries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(summaries)
}

/// Whether `uri` reaches libvirt through a local unix socket (or in-process), so that
/// the kernel reports a dead peer. `driver[+transport]://[host]/path`: no transport and
/// no host, or the `unix` transport, is local; `ssh`, `libssh`, `libssh2`, `tcp`, `tls`,
/// `ext` and a host with no transport (TLS) are remote. Anything unparseable counts as
/// remote, where keepalive is the safe side.
pub fn is_local_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let transport = scheme.split_once('+').map(|(_, transport)| transport);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    match transport {
        Some("unix") => true,
        Some(_) => false,
        None => authority.is_empty(),
    }
}

impl LibvirtHypervisor {
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn lookup(&self, domain: &str) -> Result<Domain, virt::error::Error> {
        self.connection.lookup_domain_by_name(domain)
    }

    fn read_domain(
        &self,
        domain: &Domain,
        name: String,
    ) -> Result<Option<DomainView>, HypervisorError> {
        let xml = match domain.xml_desc(0) {
            Ok(xml) => xml,
            Err(error) => {
                let failure = LibvirtFailure::from_error(&error);
                // Undefined between the listing and now: it is not running any more,
                // and its lifecycle event is on the way.
                if failure.kind() == FailureKind::DomainGone {
                    return Ok(None);
                }
                return Err(HypervisorError::ReadDomainXml {
                    domain: name,
                    kind: failure.kind(),
                    message: failure.message,
                });
            }
        };
        let hostdevs =
            parse_usb_hostdevs(&xml).map_err(|error| HypervisorError::ReadDomainXml {
                domain: name.clone(),
                kind: FailureKind::Other,
                message: error.to_string(),
            })?;
        Ok(Some(DomainView { name, hostdevs }))
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn list_running(&self) -> Result<RunningDomains, HypervisorError> {
        let domains = self
            .connection
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|error| {
                let failure = LibvirtFailure::from_error(&error);
                HypervisorError::ListDomains {
                    kind: failure.kind(),
                    message: failure.message,
                }
            })?;
        let mut listing = RunningDomains::default();
        for domain in &domains {
            // The name is the client's own copy: this makes no call.
            let name = domain.name().map_err(|error| {
                let failure = LibvirtFailure::from_error(&error);
                HypervisorError::ListDomains {
                    kind: failure.kind(),
                    message: failure.message,
                }
            })?;
            match self.read_domain(domain, name.clone()) {
                Ok(Some(view)) => listing.readable.push(view),
                Ok(None) => {}
                // One VM whose XML cannot be read leaves the others readable.
                Err(error) => listing.unreadable.push(UnreadableDomain { name, error }),
            }
        }
        listing.readable.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listing)
    }

    fn attach(&self, domain: &str, hostdev: &HostdevSpec) -> Result<(), HypervisorError> {
        let attach_error = |kind, message| HypervisorError::Attach {
            domain: domain.to_string(),
            device: hostdev.to_string(),
            kind,
            message,
        };
        let from_libvirt = |error: virt::error::Error| {
            let failure = LibvirtFailure::from_error(&error);
            attach_error(failure.kind(), failure.message)
        };
        let xml = build_usb_hostdev(hostdev)
            .map_err(|error| attach_error(FailureKind::Other, error.to_string()))?;
        let target = self.lookup(domain).map_err(from_libvirt)?;
        // Live only: the persistent definition never names a device that may be absent
        // when the VM next boots.
        target
            .attach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(from_libvirt)
    }

    fn detach(&self, domain: &str, alias: &HostdevAlias) -> Result<(), HypervisorError> {
        self.detach_alias(domain, alias, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|failure| HypervisorError::Detach {
                domain: domain.to_string(),
                alias: alias.to_string(),
                kind: failure.kind(),
                message: failure.message,
            })
    }

    fn owned_hostdevs_in_definitions(&self) -> Result<Vec<DefinedHostdevs>, HypervisorError> {
        let list_error = |failure: LibvirtFailure| HypervisorError::ListDefinitions {
            kind: failure.kind(),
            message: failure.message,
        };
        let domains = self
            .connection
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            .map_err(|error| list_error(LibvirtFailure::from_error(&error)))?;
        let mut found = Vec::new();
        for domain in &domains {
            let name = domain
                .name()
                .map_err(|error| list_error(LibvirtFailure::from_error(&error)))?;
            let xml = match domain.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE) {
                Ok(xml) => xml,
                // Undefined since the listing: nothing left to clean.
                Err(error)
                    if LibvirtFailure::from_error(&error).kind() == FailureKind::DomainGone =>
                {
                    continue
                }
                Err(error) => return Err(list_error(LibvirtFailure::from_error(&error))),
            };
            let aliases: Vec<HostdevAlias> = parse_usb_hostdevs(&xml)
                .map_err(|error| HypervisorError::ListDefinitions {
                    kind: FailureKind::Other,
                    message: format!("vm {name}: {error}"),
                })?
                .iter()
                .filter_map(UsbHostdev::owned_alias)
                .collect();
            if !aliases.is_empty() {
                found.push(DefinedHostdevs {
                    domain: name,
                    aliases,
                });
            }
        }
        found.sort_by(|a, b| a.domain.cmp(&b.domain));
        Ok(found)
    }

    fn remove_from_definition(
        &self,
        domain: &str,
        alias: &HostdevAlias,
    ) -> Result<(), HypervisorError> {
        self.detach_alias(domain, alias, sys::VIR_DOMAIN_AFFECT_CONFIG)
            .map_err(|failure| HypervisorError::RemoveFromDefinition {
                domain: domain.to_string(),
                alias: alias.to_string(),
                kind: failure.kind(),
                message: failure.message,
            })
    }
}

impl LibvirtHypervisor {
    /// `virDomainDetachDeviceAlias` with `flags`: `AFFECT_LIVE` unplugs from the running
    /// VM, `AFFECT_CONFIG` edits the persistent definition only.
    fn detach_alias(
        &self,
        domain: &str,
        alias: &HostdevAlias,
        flags: u32,
    ) -> Result<(), LibvirtFailure> {
        let from_libvirt = |error: virt::error::Error| LibvirtFailure::from_error(&error);
        // A `HostdevAlias` is one usbpass made, so this can never unplug a hostdev or a
        // controller someone else created; libvirt's alias rule keeps it free of nul.
        let alias_c = CString::new(alias.as_str()).expect("a hostdev alias has no nul byte");
        let target = self.lookup(domain).map_err(from_libvirt)?;
        // virt 0.5 does not wrap virDomainDetachDeviceAlias.
        // SAFETY: `target` holds a reference on a valid domain for the whole call, and
        // `alias_c` is a NUL-terminated string that outlives it; libvirt copies what it
        // keeps.
        let result =
            unsafe { sys::virDomainDetachDeviceAlias(target.as_ptr(), alias_c.as_ptr(), flags) };
        if result < 0 {
            return Err(from_libvirt(virt::error::Error::last_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_remote_uris() {
        for local in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///system",
            "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
            "test:///default",
            "lxc:///",
        ] {
            assert!(is_local_uri(local), "{local}");
        }
        for remote in [
            "qemu+ssh://root@host/system",
            "qemu+ssh://localhost/system",
            "qemu+tcp://host:16509/system",
            "qemu+tls://host/system",
            "qemu://host/system",
            "qemu+libssh2://user@host/system?known_hosts=/x",
            "qemu+ext:///system?command=/opt/x",
            "",
            "nonsense",
        ] {
            assert!(!is_local_uri(remote), "{remote}");
        }
    }
}
