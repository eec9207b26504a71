//! Benchmark of the daemon's decision time: from a udev event entering the loop's
//! channel to the libvirt attach call being issued, in-process against the fake
//! hypervisor. Baseline, measured in the same run: handing a message over a channel
//! to a thread blocked in `recv()`, the least any event-driven loop pays.
//!
//! Run: `cargo bench --bench decision`

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usbpass::daemon::{Daemon, DaemonOptions};
use usbpass::event::Event;
use usbpass::model::UsbDevice;
use usbpass::rules::Config;
use usbpass::testing::fake_hypervisor::{FakeConnector, FakeWorld, FixedDevices, SharedWorld};

const PLUGS: usize = 1000;

fn device(devnum: u16) -> UsbDevice {
    UsbDevice {
        syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2".into(),
        bus: 1,
        devnum,
        vendor_id: 0x046d,
        product_id: 0xc52b,
        serial: None,
        port_path: "1-2".into(),
        parent_hub: Some("usb1".into()),
        device_class: 0,
        interface_classes: Vec::new(),
        manufacturer: Some("Logitech".into()),
        product: Some("USB Receiver".into()),
        vendor_from_database: None,
        model_from_database: None,
        strings_pending: false,
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p) as usize]
}

fn wait_for(world: &SharedWorld, attaches: usize) -> Instant {
    loop {
        if let Some(at) = world.lock().attach_times.get(attaches - 1) {
            return *at;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn main() {
    let directory = tempfile::tempdir().unwrap();
    let config_path = directory.path().join("usbpass.toml");
    std::fs::write(
        &config_path,
        "[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = [\"win11\", \"fedora\"]\n",
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    // A realistic host: a few other VMs and devices the rules do not match.
    let world = SharedWorld::new(FakeWorld::with_domains(&["fedora", "lab", "win11"]));
    let (sender, receiver) = usbpass::event::event_channel();
    let options = DaemonOptions {
        config_path,
        state_path: directory.path().join("state.json"),
        watchdog: None,
    };
    let mut daemon = Daemon::new(
        FakeConnector {
            world: world.clone(),
        },
        FixedDevices(Arc::new(Mutex::new(Vec::new()))),
        config,
        options,
        sender.clone(),
        receiver,
    );
    let thread = std::thread::spawn(move || daemon.run());

    // Baseline: a thread blocked in recv() receiving an Instant.
    let (baseline_sender, baseline_receiver) = mpsc::channel::<Instant>();
    let received = Arc::new(Mutex::new(Vec::with_capacity(PLUGS)));
    let received_by_thread = received.clone();
    let baseline_thread = std::thread::spawn(move || {
        while let Ok(sent) = baseline_receiver.recv() {
            received_by_thread.lock().unwrap().push(sent.elapsed());
        }
    });

    let mut decisions = Vec::with_capacity(PLUGS);
    let mut handoffs = Vec::with_capacity(PLUGS);
    for plug in 0..PLUGS {
        // Paired: one baseline handoff, then one plug, alternating.
        baseline_sender.send(Instant::now()).unwrap();
        while received.lock().unwrap().len() <= plug {
            std::thread::sleep(Duration::from_micros(50));
        }
        handoffs.push(received.lock().unwrap()[plug]);

        let devnum = 2 + (plug % 120) as u16;
        let sent = Instant::now();
        sender
            .send(Event::DeviceAdded {
                device: Box::new(device(devnum)),
                received: sent,
            })
            .unwrap();
        let called = wait_for(&world, plug + 1);
        decisions.push(called.duration_since(sent));
        // Unplug, so the next plug is a fresh attach.
        sender
            .send(Event::DeviceRemoved {
                syspath: device(devnum).syspath,
                address: Some(device(devnum).address()),
            })
            .unwrap();
        while !world.lock().aliases_in("win11").is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        }
        // Let the loop finish that round (list, state file) so plugs do not queue.
        std::thread::sleep(Duration::from_millis(1));
    }
    sender.send(Event::Terminate).unwrap();
    thread.join().unwrap().unwrap();
    drop(baseline_sender);
    baseline_thread.join().unwrap();

    let decision = median(decisions.clone());
    let handoff = median(handoffs);
    println!("decision time, udev event in -> attach call out, {PLUGS} plugs:");
    println!(
        "  baseline (channel handoff to a blocked thread), median: {:>8.1} us",
        handoff.as_secs_f64() * 1e6
    );
    println!(
        "  usbpass decision, median:                             {:>8.1} us",
        decision.as_secs_f64() * 1e6
    );
    println!(
        "  usbpass decision, 99th percentile:                    {:>8.1} us",
        percentile(decisions, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "  ratio decision/baseline (medians):                    {:>8.2}",
        decision.as_secs_f64() / handoff.as_secs_f64()
    );
    println!(
        "  target: median under 1 ms: {}",
        if decision < Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
}
