//! Fuzz target: the QEMU argv rewriter (`qemu_args::rewrite_args`). The input is split
//! at NUL bytes into argv, as the kernel hands it over (so words may be any non-NUL
//! bytes, not only UTF-8). Checked: no panic; the output has as many words; every word
//! not reported as rewritten is kept byte for byte; and a rewritten command line, fed
//! through again, has nothing left to rewrite (a rewritten argument reconnects by itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use usbpass::rules::ReconnectMode;
use usbpass::wrapper::qemu_args::{rewrite_args, Decision, HostDeviceFacts, Outcome, Selector};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the answers, so the fuzzer explores each decision.
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let args: Vec<OsString> = rest
        .split(|&b| b == 0)
        .map(|word| OsString::from_vec(word.to_vec()))
        .collect();
    let mut asked = 0usize;
    let decide = |selector: &Selector| {
        asked += 1;
        let hostport = match choice & 0b11 {
            0 => None,
            1 => Some("2.3".to_string()),
            2 => Some("1".to_string()),
            _ => Some("4.1.2.3.4".to_string()),
        };
        let bus = match selector {
            Selector::BusAddress { bus, .. } => *bus,
            _ => 3,
        };
        match (choice >> 2) % 4 {
            0 => Decision::Keep,
            1 => Decision::Warn("gone".to_string()),
            mode => Decision::Rewrite {
                facts: HostDeviceFacts {
                    vendor_id: 0x046d,
                    product_id: 0xc52b,
                    bus,
                    hostport,
                },
                mode: if mode == 2 {
                    ReconnectMode::Id
                } else {
                    ReconnectMode::Port
                },
            },
        }
    };
    let (out, outcomes) = rewrite_args(&args, decide);
    assert_eq!(out.len(), args.len());
    let mut rewritten = vec![false; args.len()];
    for outcome in &outcomes {
        if let Outcome::Rewritten { index, before, .. } = outcome {
            assert_eq!(before, &args[*index]);
            rewritten[*index] = true;
        }
    }
    for (index, (before, after)) in args.iter().zip(&out).enumerate() {
        if !rewritten[index] {
            assert_eq!(before, after, "word {index} changed without a rewrite");
        }
    }
    if rewritten.iter().any(|&r| r) {
        let (again, outcomes) = rewrite_args(&out, |_| Decision::Rewrite {
            facts: HostDeviceFacts {
                vendor_id: 1,
                product_id: 2,
                bus: 3,
                hostport: Some("4".to_string()),
            },
            mode: ReconnectMode::Id,
        });
        // Only the words rewritten the first time are checked: the others may hold
        // arguments that were kept, warned about or unparsable in the first pass too.
        let redone: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Rewritten { index, .. } | Outcome::Unparsed { index, .. }
                    if rewritten[*index] =>
                {
                    Some(o)
                }
                _ => None,
            })
            .collect();
        assert!(
            redone.is_empty(),
            "rewritten argv rewritten again: {out:?} -> {redone:?}"
        );
        for (index, &was_rewritten) in rewritten.iter().enumerate() {
            if was_rewritten {
                assert_eq!(again[index], out[index]);
            }
        }
    }
});
