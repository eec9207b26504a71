//! The node bookkeeping behind the watcher: what a plug and an unplug, as libvirt
//! reports them node by node, turn into. The XML is libvirt 9's format (see
//! `node_devices`); the round trips themselves are covered by tests/libvirt_node_devices.rs.

use super::*;
use crate::model::InterfaceClass;

fn device_node(name: &str, port: &str, devnum: u16) -> NodeDevice {
    parse_node_device(&format!(
        "<device>
  <name>{name}</name>
  <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/{port}</path>
  <devnode type='dev'>/dev/bus/usb/001/{devnum:03}</devnode>
  <parent>usb_usb1</parent>
  <driver>
    <name>usb</name>
  </driver>
  <capability type='usb_device'>
    <bus>1</bus>
    <device>{devnum}</device>
    <product id='0x6001'>FT232 Serial (UART) IC</product>
    <vendor id='0x0403'>Future Technology Devices International, Ltd</vendor>
  </capability>
</device>
"
    ))
    .unwrap()
}

fn interface_node(parent: &str, port: &str, number: u8, class: u8) -> NodeDevice {
    parse_node_device(&format!(
        "<device>
  <name>{parent}_1_{number}</name>
  <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/{port}/{port}:1.{number}</path>
  <parent>{parent}</parent>
  <capability type='usb'>
    <number>{number}</number>
    <class>{class}</class>
    <subclass>0</subclass>
    <protocol>0</protocol>
  </capability>
</device>
"
    ))
    .unwrap()
}

#[test]
fn a_plug_is_announced_once_an_interface_is_known() {
    let mut known = Known::default();
    assert_eq!(
        known.created(device_node("usb_1_2", "1-2", 7)).as_deref(),
        Some("usb_1_2")
    );
    // Without an interface it could be a hub: not listed yet.
    assert_eq!(known.usb_device("usb_1_2"), None);
    assert!(known.all().is_empty());
    assert_eq!(
        known
            .created(interface_node("usb_1_2", "1-2", 0, 0xff))
            .as_deref(),
        Some("usb_1_2")
    );
    let device = known.usb_device("usb_1_2").unwrap();
    assert_eq!(device.to_string(), "0403:6001 at 001:007 (port 1-2)");
    assert_eq!(device.serial, None);
    assert_eq!(
        device.interface_classes,
        vec![InterfaceClass {
            class: 0xff,
            subclass: 0,
            protocol: 0
        }]
    );
    assert_eq!(known.all(), vec![device]);
    // Other nodes concern no device.
    assert_eq!(
        known.created(NodeDevice::Other {
            name: "net_eth0".into()
        }),
        None
    );
}

#[test]
fn an_unplug_removes_exactly_the_instance_the_node_was() {
    let mut known = Known::default();
    known.created(device_node("usb_1_2", "1-2", 7));
    known.created(interface_node("usb_1_2", "1-2", 0, 3));
    known.created(interface_node("usb_1_2", "1-2", 1, 3));
    // The kernel removes the interfaces first: nothing for the daemon yet.
    assert_eq!(known.deleted("usb_1_2_1_0"), None);
    assert_eq!(known.deleted("usb_1_2_1_1"), None);
    assert_eq!(
        known.deleted("usb_1_2"),
        Some(Event::DeviceRemoved {
            syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2".into(),
            address: Some(BusAddress { bus: 1, device: 7 }),
        })
    );
    assert!(known.devices.is_empty() && known.interfaces.is_empty());
    // A node we never knew.
    assert_eq!(known.deleted("usb_1_9"), None);
}

#[test]
fn a_replug_on_the_same_port_is_a_new_instance() {
    let mut known = Known::default();
    known.created(device_node("usb_1_2", "1-2", 7));
    known.created(interface_node("usb_1_2", "1-2", 0, 3));
    // The device node goes before its interface's DELETED was seen (say it was lost):
    // the interface goes with it, and does not make the next plug look described.
    assert!(known.deleted("usb_1_2").is_some());
    known.created(device_node("usb_1_2", "1-2", 8));
    assert_eq!(known.usb_device("usb_1_2"), None);
    known.created(interface_node("usb_1_2", "1-2", 0, 8));
    let device = known.usb_device("usb_1_2").unwrap();
    assert_eq!(device.address(), BusAddress { bus: 1, device: 8 });
    assert_eq!(device.interface_classes[0].class, 8);
}

#[test]
fn a_hub_is_known_by_its_interface() {
    let mut known = Known::default();
    known.created(device_node("usb_1_4", "1-4", 3));
    known.created(interface_node("usb_1_4", "1-4", 0, 9));
    assert!(known.usb_device("usb_1_4").unwrap().is_hub());
}

/// Runs the worker's loop over notices queued up front (one batch, as when they arrive
/// while it reads), with `nodes` standing in for libvirt's XML.
fn events_for(notices: Vec<NodeNotice>, nodes: Vec<NodeDevice>) -> Vec<Event> {
    let (notice_sender, notice_receiver) = mpsc::channel();
    for notice in notices {
        notice_sender.send(notice).unwrap();
    }
    drop(notice_sender);
    let (sender, receiver) = crate::event::event_channel();
    let read = |name: &str| nodes.iter().find(|node| node.name() == name).cloned();
    let known = Mutex::new(Known::default());
    handle_notices(
        &notice_receiver,
        read,
        &known,
        &sender,
        "qemu+ssh://other/system",
    );
    drop(sender);
    receiver.into_iter().collect()
}

fn created(name: &str, received: Instant) -> NodeNotice {
    NodeNotice::Created {
        name: name.into(),
        received,
    }
}

#[test]
fn a_device_and_its_interfaces_in_one_batch_are_one_announcement() {
    let at = Instant::now();
    let later = at + std::time::Duration::from_millis(3);
    let events = events_for(
        vec![
            created("usb_1_2", at),
            created("usb_1_2_1_0", later),
            created("usb_1_2_1_1", later),
            created("usb_1_2_1_9", later), // gone before it was read
            created("net_eth0", later),
        ],
        vec![
            device_node("usb_1_2", "1-2", 7),
            interface_node("usb_1_2", "1-2", 0, 3),
            interface_node("usb_1_2", "1-2", 1, 8),
            NodeDevice::Other {
                name: "net_eth0".into(),
            },
        ],
    );
    assert_eq!(events.len(), 1, "{events:?}");
    let Event::DeviceAdded { device, received } = &events[0] else {
        panic!("{events:?}");
    };
    // Timed from the device's own notice, with both interfaces.
    assert_eq!(*received, at);
    assert_eq!(device.interface_classes.len(), 2);
}

#[test]
fn an_unplug_and_a_lost_connection_reach_the_daemon() {
    let at = Instant::now();
    let events = events_for(
        vec![
            created("usb_1_2", at),
            created("usb_1_2_1_0", at),
            NodeNotice::Deleted {
                name: "usb_1_2_1_0".into(),
            },
            NodeNotice::Deleted {
                name: "usb_1_2".into(),
            },
            NodeNotice::Closed {
                reason: "libvirtd stopped answering keepalives",
            },
            created("usb_1_3", at),
        ],
        vec![
            device_node("usb_1_2", "1-2", 7),
            interface_node("usb_1_2", "1-2", 0, 3),
        ],
    );
    // Plugged and gone within one batch: the removal only (the daemon ignores the
    // removal of a device it never heard of), then the failure, and nothing after it.
    assert_eq!(
        events,
        vec![
            Event::DeviceRemoved {
                syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2".into(),
                address: Some(BusAddress { bus: 1, device: 7 }),
            },
            Event::SourceFailed {
                source: "libvirt node devices",
                message: "connection to qemu+ssh://other/system lost: libvirtd stopped \
                          answering keepalives"
                    .into(),
            },
        ]
    );
}
