//! Tests of the node-device XML reader against libvirt's own samples and hand-made edge cases.

use super::*;

/// libvirt's own test data, tests/nodedevschemadata/usb_device_1d6b_1_0000_00_1d_0.xml:
/// a USB 1.1 root hub as the old HAL backend named it, without `<path>`.
const ROOT_HUB_SCHEMA_SAMPLE: &str = "<device>
  <name>usb_device_1d6b_1_0000_00_1d_0</name>
  <parent>pci_8086_27c8</parent>
  <capability type='usb_device'>
    <bus>2</bus>
    <device>1</device>
    <product id='0x0001'>1.1 root hub</product>
    <vendor id='0x1d6b'>Linux Foundation</vendor>
  </capability>
</device>
";

/// libvirt's tests/nodedevschemadata/usb_device_1d6b_1_0000_00_1d_0_if0.xml: that root
/// hub's one interface, class 9 (hub), in decimal.
const ROOT_HUB_INTERFACE_SCHEMA_SAMPLE: &str = "<device>
  <name>usb_device_1d6b_1_0000_00_1d_0_if0</name>
  <parent>usb_device_1d6b_1_0000_00_1d_0</parent>
  <capability type='usb'>
    <number>0</number>
    <class>9</class>
    <subclass>0</subclass>
    <protocol>0</protocol>
  </capability>
</device>
";

/// libvirt's tests/nodedevschemadata/pci_8086_10c9_sriov_pf.xml: a PCI function, with
/// `<bus>`, `<product>` and `<vendor>` of its own that must not be read as USB.
const PCI_SCHEMA_SAMPLE: &str = "<device>
  <name>pci_0000_02_00_0</name>
  <parent>pci_0000_00_04_0</parent>
  <capability type='pci'>
    <domain>0</domain>
    <bus>2</bus>
    <slot>0</slot>
    <function>0</function>
    <product id='0x10c9'>82576 Gigabit Network Connection</product>
    <vendor id='0x8086'>Intel Corporation</vendor>
    <iommuGroup number='12'>
      <address domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
      <address domain='0x0000' bus='0x02' slot='0x00' function='0x1'/>
    </iommuGroup>
    <numa node='0'/>
  </capability>
</device>
";

/// A device behind a hub as libvirt 9's udev backend writes it (`virNodeDeviceDefFormat`:
/// name, path, devnode, parent, driver, capability; IDs `0x%04x`, numbers `%d`, text
/// escaped). This machine has no USB, so this one is written from the formatter, not
/// captured.
const RECEIVER_UDEV: &str = "<device>
  <name>usb_1_2_3</name>
  <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.3</path>
  <devnode type='dev'>/dev/bus/usb/001/005</devnode>
  <parent>usb_1_2</parent>
  <driver>
    <name>usb</name>
  </driver>
  <capability type='usb_device'>
    <bus>1</bus>
    <device>5</device>
    <product id='0xc52b'>Unifying Receiver</product>
    <vendor id='0x046d'>Logitech, Inc. &amp; Co</vendor>
  </capability>
</device>
";

const RECEIVER_INTERFACE_UDEV: &str = "<device>
  <name>usb_1_2_3_1_0</name>
  <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.3/1-2.3:1.0</path>
  <parent>usb_1_2_3</parent>
  <driver>
    <name>usbhid</name>
  </driver>
  <capability type='usb'>
    <number>0</number>
    <class>3</class>
    <subclass>1</subclass>
    <protocol>1</protocol>
  </capability>
</device>
";

fn usb_device(xml: &str) -> UsbDeviceNode {
    match parse_node_device(xml).unwrap() {
        NodeDevice::UsbDevice(node) => node,
        other => panic!("not a usb_device: {other:?}"),
    }
}

fn interface(xml: &str) -> UsbInterfaceNode {
    match parse_node_device(xml).unwrap() {
        NodeDevice::UsbInterface(node) => node,
        other => panic!("not a usb interface: {other:?}"),
    }
}

fn class(class: u8, subclass: u8, protocol: u8) -> InterfaceClass {
    InterfaceClass {
        class,
        subclass,
        protocol,
    }
}

#[test]
fn libvirts_own_usb_device_sample() {
    assert_eq!(
        usb_device(ROOT_HUB_SCHEMA_SAMPLE),
        UsbDeviceNode {
            name: "usb_device_1d6b_1_0000_00_1d_0".into(),
            sysfs_path: None,
            parent: Some("pci_8086_27c8".into()),
            bus: 2,
            device: 1,
            vendor_id: 0x1d6b,
            product_id: 0x0001,
            vendor_name: Some("Linux Foundation".into()),
            product_name: Some("1.1 root hub".into()),
        }
    );
    assert_eq!(
        interface(ROOT_HUB_INTERFACE_SCHEMA_SAMPLE),
        UsbInterfaceNode {
            name: "usb_device_1d6b_1_0000_00_1d_0_if0".into(),
            parent: Some("usb_device_1d6b_1_0000_00_1d_0".into()),
            class: class(9, 0, 0),
        }
    );
    // Without a sysfs path the device has no key and no port: never listed.
    assert_eq!(
        usb_device_from_node(&usb_device(ROOT_HUB_SCHEMA_SAMPLE), &[class(9, 0, 0)]),
        Err(Unusable::NoSysfsPath)
    );
}

#[test]
fn other_capabilities_are_not_usb() {
    assert_eq!(
        parse_node_device(PCI_SCHEMA_SAMPLE).unwrap(),
        NodeDevice::Other {
            name: "pci_0000_02_00_0".into()
        }
    );
}

#[test]
fn a_udev_backend_device_becomes_a_usb_device_with_the_unknown_left_unknown() {
    let node = usb_device(RECEIVER_UDEV);
    assert_eq!(node.vendor_name.as_deref(), Some("Logitech, Inc. & Co"));
    let classes = [interface(RECEIVER_INTERFACE_UDEV).class];
    let device = usb_device_from_node(&node, &classes).unwrap();
    assert_eq!(
        device,
        UsbDevice {
            syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.3".into(),
            bus: 1,
            devnum: 5,
            vendor_id: 0x046d,
            product_id: 0xc52b,
            serial: None,
            port_path: "1-2.3".into(),
            parent_hub: Some("1-2".into()),
            device_class: 0,
            interface_classes: vec![class(3, 1, 1)],
            manufacturer: None,
            product: None,
            vendor_from_database: Some("Logitech, Inc. & Co".into()),
            model_from_database: Some("Unifying Receiver".into()),
            strings_pending: false,
        }
    );
    assert_eq!(device.to_string(), "046d:c52b at 001:005 (port 1-2.3)");
}

#[test]
fn a_device_is_a_hub_by_its_interface_and_unknown_without_one() {
    let xml = RECEIVER_UDEV
        .replace("/usb1/1-2/1-2.3<", "/usb1/1-2<")
        .replace("usb_1_2_3", "usb_1_2");
    let node = usb_device(&xml);
    assert_eq!(
        usb_device_from_node(&node, &[]),
        Err(Unusable::NoInterfaces)
    );
    let hub = usb_device_from_node(&node, &[class(9, 0, 1), class(9, 0, 2)]).unwrap();
    assert!(hub.is_hub());
    assert_eq!(hub.port_path, "1-2");
    assert_eq!(hub.parent_hub.as_deref(), Some("usb1"));
    // A root hub: its kernel name is usbN, with no hub above it.
    let root = RECEIVER_UDEV.replace("/usb1/1-2/1-2.3<", "/usb1<");
    let root = usb_device_from_node(&usb_device(&root), &[class(9, 0, 0)]).unwrap();
    assert_eq!(root.port_path, "usb1");
    assert_eq!(root.parent_hub, None);
    assert!(root.is_hub());
    // A path whose last component is no USB kernel name is refused, not guessed at.
    let odd = RECEIVER_UDEV.replace("/usb1/1-2/1-2.3<", "/usb1/1-2/1-2.3:1.0<");
    assert_eq!(
        usb_device_from_node(&usb_device(&odd), &[class(3, 0, 0)]),
        Err(Unusable::NoSysfsPath)
    );
}

#[test]
fn empty_names_and_duplicate_interfaces() {
    let xml = RECEIVER_UDEV
        .replace(">Unifying Receiver</product>", "/>")
        .replace(">Logitech, Inc. &amp; Co</vendor>", "></vendor>");
    let node = usb_device(&xml);
    assert_eq!(node.product_id, 0xc52b);
    assert_eq!(node.product_name, None);
    assert_eq!(node.vendor_name, None);
    let device = usb_device_from_node(&node, &[class(3, 1, 1), class(3, 1, 1)]).unwrap();
    assert_eq!(device.interface_classes, vec![class(3, 1, 1)]);
}

#[test]
fn broken_xml_is_an_error_naming_the_node() {
    let missing_bus = RECEIVER_UDEV.replace("<bus>1</bus>", "");
    assert_eq!(
        parse_node_device(&missing_bus).unwrap_err().to_string(),
        "bad node device usb_1_2_3: <bus> is missing"
    );
    let big = RECEIVER_UDEV.replace("<device>5</device>", "<device>70000</device>");
    assert_eq!(
        parse_node_device(&big).unwrap_err().to_string(),
        "bad node device usb_1_2_3: <device> \"70000\" is not an unsigned 16-bit number"
    );
    let class_too_big = RECEIVER_INTERFACE_UDEV.replace("<class>3<", "<class>256<");
    assert_eq!(
        parse_node_device(&class_too_big).unwrap_err().to_string(),
        "bad node device usb_1_2_3_1_0: <class> \"256\" is not an unsigned 8-bit number"
    );
    assert!(matches!(
        parse_node_device("<domain><name>x</name></domain>"),
        Err(NodeDeviceXmlError::NotNodeDeviceXml { .. })
    ));
    assert!(matches!(
        parse_node_device("<device><name>x</name>"),
        Err(NodeDeviceXmlError::TruncatedNodeDeviceXml)
    ));
    assert!(parse_node_device("").is_err());
    assert!(parse_node_device("<device><name>x</name></device><device/>").is_err());
}
