//! The loop's tests of rules-file saves: every common way of writing the file, watched
//! by the real inotify watcher, with a device attached. None may detach it.

use super::*;
use crate::daemon::watch::spawn_config_watcher;
use std::io::Write;
use std::path::Path;

/// The rules in two parts: first `extra` rules for devices that are not plugged in,
/// then the receiver's rule. Each save brings a count the state file shows, so the test
/// sees that it was applied; and a file cut after the first part is valid TOML without
/// the receiver's rule, the worst case of a file read mid-write.
fn rules_in_two_parts(extra: usize) -> (String, String) {
    let mut spares = String::new();
    for index in 0..extra {
        spares.push_str(&format!(
            "[[rule]]\nname = \"spare{index}\"\nid = \"1234:{index:04x}\"\nvm = \"win11\"\n\n"
        ));
    }
    (spares, RULES.to_string())
}

/// Hands every event the watcher sends within `quiet` of the last one to the loop and
/// waits until the loop is idle again.
fn forward_watcher_events(
    harness: &Harness,
    watcher: &mpsc::Receiver<Event>,
    quiet: Duration,
) -> usize {
    let mut forwarded = 0;
    while let Ok(event) = watcher.recv_timeout(quiet) {
        harness.send_and_settle(event);
        forwarded += 1;
    }
    forwarded
}

#[test]
fn no_common_way_of_saving_the_rules_file_detaches_a_device() {
    let harness = Harness::start(
        RULES,
        FakeWorld::with_domains(&["win11"]),
        vec![receiver(5)],
    );
    harness.wait_until("the first attach", |w| w.aliases_in("win11").len() == 1);
    let directory = harness.directory.path().to_path_buf();
    let path = directory.join("usbpass.toml");
    let (watcher_sender, watcher) = crate::event::event_channel();
    spawn_config_watcher(&path, watcher_sender).unwrap();
    let quiet = Duration::from_millis(300);

    // Each save: how a writer puts the two parts in place. `seen` hands the watcher's
    // events so far to the loop, at the moments a reader could catch the file between
    // two writes.
    type Save = Box<dyn Fn(&Path, &(String, String), &dyn Fn())>;
    fn write_in_two_parts(file: &mut std::fs::File, parts: &(String, String), seen: &dyn Fn()) {
        file.write_all(parts.0.as_bytes()).unwrap();
        seen();
        file.write_all(parts.1.as_bytes()).unwrap();
    }
    let saves: Vec<(&str, Save)> = vec![
        (
            "an editor that moves the old file away and writes a new one (vim)",
            Box::new(|path, parts, seen| {
                std::fs::rename(path, path.with_extension("toml~")).unwrap();
                seen();
                // The loop may be busy when the file appears and read it only once
                // the first part is written.
                let mut file = std::fs::File::create(path).unwrap();
                write_in_two_parts(&mut file, parts, seen);
            }),
        ),
        (
            "in place: truncate, then write in two parts",
            Box::new(|path, parts, seen| {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .unwrap();
                seen();
                write_in_two_parts(&mut file, parts, seen);
            }),
        ),
        (
            "cp new.toml usbpass.toml",
            Box::new(|path, parts, _| {
                let source = path.with_file_name("new.toml");
                std::fs::write(&source, format!("{}{}", parts.0, parts.1)).unwrap();
                std::fs::copy(&source, path).unwrap();
            }),
        ),
        (
            "sed -i: a temporary file renamed over it",
            Box::new(|path, parts, seen| {
                let temporary = path.with_file_name("sedAbC123");
                let mut file = std::fs::File::create(&temporary).unwrap();
                write_in_two_parts(&mut file, parts, seen);
                drop(file);
                std::fs::rename(&temporary, path).unwrap();
            }),
        ),
        (
            "rm, then an empty file, then its contents a moment later",
            Box::new(|path, parts, seen| {
                std::fs::remove_file(path).unwrap();
                seen();
                drop(std::fs::File::create(path).unwrap());
                seen();
                std::fs::write(path, format!("{}{}", parts.0, parts.1)).unwrap();
            }),
        ),
    ];
    for (extra, (how, save)) in saves.iter().enumerate() {
        let parts = rules_in_two_parts(extra + 1);
        save(&path, &parts, &|| {
            forward_watcher_events(&harness, &watcher, quiet);
        });
        forward_watcher_events(&harness, &watcher, quiet);
        let state = harness.state();
        assert_eq!(state.rule_count, extra + 2, "{how}: the save was applied");
        assert_eq!(state.config_error, None, "{how}");
        assert_eq!(
            harness.count(|call| matches!(call, Call::Detach { .. })),
            0,
            "{how}: {:#?}",
            harness.world.lock().calls
        );
        assert_eq!(harness.count(|call| matches!(call, Call::Attach { .. })), 1);
    }
    harness.stop().unwrap();
}

#[test]
fn an_empty_rules_file_keeps_the_previous_rules_and_says_so() {
    let harness = Harness::start(
        RULES,
        FakeWorld::with_domains(&["win11"]),
        vec![receiver(5)],
    );
    let path = harness.directory.path().join("usbpass.toml");
    std::fs::write(&path, "").unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    let state = harness.state();
    assert_eq!(state.rule_count, 1);
    let error = state.config_error.expect("the empty file is reported");
    assert!(
        error.ends_with("usbpass.toml is empty: keeping the previous 1 rules until it has content"),
        "{error}"
    );
    assert_eq!(harness.world.lock().aliases_in("win11").len(), 1);
    // A file that says it means no rules is applied.
    std::fs::write(&path, "# no rules for now\n").unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    assert_eq!(harness.state().rule_count, 0);
    assert_eq!(harness.state().config_error, None);
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    harness.stop().unwrap();
}
