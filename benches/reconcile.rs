//! Benchmark of the reconcile core at scale: 200 devices × 50 running VMs × 1,000
//! rules, against a baseline measured in the same run (matching every device against
//! the rules and nothing else: the least any rule engine must do).
//!
//! Run: `cargo bench --bench reconcile`

use std::hint::black_box;
use std::time::{Duration, Instant};
use usbpass::hypervisor::{DomainView, UsbHostdev};
use usbpass::model::alias::HostdevAlias;
use usbpass::model::UsbDevice;
use usbpass::reconcile::plan;
use usbpass::rules::{Config, GiveBack, Matcher, ReconnectMode, Rule};

const DEVICES: usize = 200;
const VMS: usize = 50;
const RULES: usize = 1_000;

fn device(index: usize) -> UsbDevice {
    let bus = 1 + (index / 100) as u16;
    let devnum = 2 + (index % 100) as u16;
    UsbDevice {
        syspath: format!("/sys/devices/pci0000:00/usb{bus}/{bus}-{devnum}"),
        bus,
        devnum,
        vendor_id: 0x1000 + (index % 37) as u16,
        product_id: index as u16,
        serial: Some(format!("SERIAL{index:04}")),
        port_path: format!("{bus}-{}.{}", 1 + index % 4, 1 + index % 7),
        parent_hub: Some(format!("{bus}-{}", 1 + index % 4)),
        device_class: 0,
        interface_classes: Vec::new(),
        manufacturer: Some("Vendor".into()),
        product: Some(format!("Device {index}")),
        vendor_from_database: None,
        model_from_database: None,
        strings_pending: false,
    }
}

/// 1,000 rules, most of which match nothing present, so that matching walks far;
/// the last 200 match one device each by serial, spread over the VMs.
fn rules() -> Vec<Rule> {
    (0..RULES)
        .map(|index| {
            let target = index % DEVICES;
            let matcher = if index < RULES - DEVICES {
                Matcher {
                    vendor_id: Some(0x2000 + (index % 50) as u16),
                    product_id: Some(index as u16),
                    ..Matcher::default()
                }
            } else {
                Matcher {
                    vendor_id: Some(0x1000 + (target % 37) as u16),
                    serial: Some(format!("SERIAL{target:04}")),
                    ..Matcher::default()
                }
            };
            Rule {
                name: format!("rule-{index}"),
                group: None,
                matcher,
                vms: vec![
                    format!("vm-{}", target % VMS),
                    format!("vm-{}", (target + 1) % VMS),
                ],
                reconnect: ReconnectMode::Id,
                give_back: GiveBack::AtOnce,
                follow_seconds: None,
                keep_off_host: None,
                line: index + 1,
            }
        })
        .collect()
}

/// Every VM runs; half the devices already sit where they belong, the rest are new.
fn domains(devices: &[UsbDevice]) -> Vec<DomainView> {
    (0..VMS)
        .map(|vm| DomainView {
            name: format!("vm-{vm}"),
            hostdevs: devices
                .iter()
                .enumerate()
                .filter(|(index, _)| index % VMS == vm && index % 2 == 0)
                .map(|(_, device)| UsbHostdev {
                    alias: Some(HostdevAlias::for_rules(device).to_string()),
                    id: Some(device.id()),
                    address: Some(device.address()),
                })
                .collect(),
        })
        .collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn measure(runs: usize, mut work: impl FnMut()) -> Duration {
    for _ in 0..runs / 10 {
        work();
    }
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                work();
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let devices: Vec<UsbDevice> = (0..DEVICES).map(device).collect();
    let config = Config::from_rules(rules());
    let domains = domains(&devices);
    let check = plan(&config, &devices, &domains);
    assert_eq!(
        check.actions.len(),
        DEVICES / 2,
        "half the devices need attaching"
    );

    let runs = 200;
    // Paired: alternate so that both see the same machine state.
    let mut baseline = Vec::with_capacity(runs);
    let mut full = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        for device in &devices {
            black_box(config.first_match(black_box(device)));
        }
        baseline.push(start.elapsed());
        let start = Instant::now();
        black_box(plan(
            black_box(&config),
            black_box(&devices),
            black_box(&domains),
        ));
        full.push(start.elapsed());
    }
    let baseline = median(baseline);
    let full = median(full);
    let idle = measure(runs, || {
        let mut settled = domains.clone();
        black_box(&mut settled);
    });
    println!("reconcile {DEVICES} devices x {VMS} vms x {RULES} rules, median of {runs}:");
    println!(
        "  baseline (first_match for every device): {:>9.3} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!(
        "  full plan:                                {:>9.3} ms",
        full.as_secs_f64() * 1e3
    );
    println!(
        "  ratio full/baseline:                      {:>9.2}",
        full.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  (cloning the domain list, for scale:      {:>9.3} ms)",
        idle.as_secs_f64() * 1e3
    );
    println!(
        "  target: full plan under 5 ms: {}",
        if full < Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        }
    );
}
