//! The kernel's names of USB devices in sysfs: port paths such as `1-2.3`, root hubs
//! such as `usb1`, and which hub a port path hangs off.

/// `BUS-PORT[.PORT]...`, as the kernel names a device behind a root port in sysfs: the
/// physical port, stable across replugs. Root hubs (`usb1`) are not port paths.
pub fn is_port_path(text: &str) -> bool {
    let Some((bus, ports)) = text.split_once('-') else {
        return false;
    };
    let number = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    number(bus) && ports.split('.').all(number)
}

/// `usbN`, as the kernel names a root hub in sysfs.
pub fn is_root_hub_name(text: &str) -> bool {
    text.strip_prefix("usb")
        .is_some_and(|bus| !bus.is_empty() && bus.bytes().all(|b| b.is_ascii_digit()))
}

/// The kernel's name of any USB device: `usbN` for a root hub, `B-P[.P...]` below it.
/// The names the rules file's `hub` key and the command line's `port:` accept.
pub fn is_usb_device_name(text: &str) -> bool {
    is_root_hub_name(text) || is_port_path(text)
}

/// The kernel name of the hub a port path hangs off: `1-2.3` → `1-2`, and `1-2` → the
/// root hub `usb1`. None for a root hub, which hangs off no USB hub, and for anything
/// that is no port path.
pub fn parent_hub_of(port_path: &str) -> Option<String> {
    if !is_port_path(port_path) {
        return None;
    }
    match port_path.rsplit_once('.') {
        Some((hub, _)) => Some(hub.to_string()),
        None => port_path
            .split_once('-')
            .map(|(bus, _)| format!("usb{bus}")),
    }
}

/// QEMU's `hostport` for a kernel port path: `1-2.3` → `2.3`. Root hubs (`usb1`) have
/// none.
pub fn hostport_of(port_path: &str) -> Option<String> {
    let (_, ports) = port_path.split_once('-')?;
    (!ports.is_empty()).then(|| ports.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostport_of_root_hub_is_none() {
        assert_eq!(hostport_of("usb1"), None);
        assert_eq!(hostport_of("3-1.4.2"), Some("1.4.2".to_string()));
    }

    #[test]
    fn port_paths() {
        for good in ["1-1", "3-2.4", "1-10.1.2"] {
            assert!(is_port_path(good), "{good}");
        }
        for bad in ["", "1", "1-", "1-a", "usb1", "1-2.", "-1", "1-2..3"] {
            assert!(!is_port_path(bad), "{bad}");
        }
    }

    #[test]
    fn usb_device_names() {
        for good in ["usb1", "usb12", "1-1", "1-2.3", "10-4.1.2.3"] {
            assert!(is_usb_device_name(good), "{good}");
        }
        for bad in [
            "usb", "usbx", "1", "1-", "-1", "1-2.", "1-2..3", "1-a", "1:1.0", "1-2:1.0",
        ] {
            assert!(!is_usb_device_name(bad), "{bad}");
        }
    }

    #[test]
    fn parent_hubs() {
        assert_eq!(parent_hub_of("1-2.3").as_deref(), Some("1-2"));
        assert_eq!(parent_hub_of("3-1.4.2").as_deref(), Some("3-1.4"));
        assert_eq!(parent_hub_of("1-2").as_deref(), Some("usb1"));
        assert_eq!(parent_hub_of("12-4").as_deref(), Some("usb12"));
        assert_eq!(parent_hub_of("usb1"), None);
        assert_eq!(parent_hub_of("1-2:1.0"), None);
    }
}
