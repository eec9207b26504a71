//! Properties of the QEMU argv rewriter (`wrapper::qemu_args::rewrite_args`) over random
//! command lines mixing unrelated options (whose values may be any bytes, even ones that
//! look like usb-host options), flags, positional words, `-usbdevice host:...` and
//! `-device usb-host,...` in keyval and JSON form: every word it does not own passes
//! through byte for byte and in order, and inside a rewritten word every property that
//! does not pick the host device is kept.

use proptest::prelude::*;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use usbpass::rules::ReconnectMode;
use usbpass::wrapper::qemu_args::{rewrite_args, Decision, HostDeviceFacts, Outcome};

/// The properties that pick the host device; a rewrite replaces exactly these.
const SELECTOR_KEYS: &[&str] = &[
    "hostbus",
    "hostaddr",
    "hostport",
    "hostdevice",
    "vendorid",
    "productid",
];
/// Keys of the properties a usb-host device carries besides its selector.
const OTHER_KEYS: &[&str] = &["id", "bus", "port", "bootindex", "x-extra"];
/// Options without a value, which must not swallow the next word.
const FLAGS: &[&str] = &[
    "-S",
    "-nodefaults",
    "--no-user-config",
    "-enable-kvm",
    "-usb",
];
/// Options with a value that is never ours, whatever it says.
const VALUED: &[&str] = &["-append", "-name", "-m", "-object", "-fw_cfg", "--chardev"];

/// One piece of a command line: its words, and which of them is a usb-host argument
/// the rewriter owns (at most the last word).
#[derive(Debug, Clone)]
struct Piece {
    words: Vec<OsString>,
    owned: bool,
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    // Any bytes but NUL, which cannot be in an argv word; often non-UTF-8.
    proptest::collection::vec(1u8..=255, 0..24)
}

fn keyval_escape(value: &[u8]) -> Vec<u8> {
    let mut escaped = Vec::with_capacity(value.len());
    for &b in value {
        escaped.push(b);
        if b == b',' {
            escaped.push(b',');
        }
    }
    escaped
}

fn not_usb_host(word: &[u8]) -> bool {
    !word.windows(8).any(|w| w == b"usb-host")
}

/// The extra properties of a device: distinct keys, any values.
fn extras() -> impl Strategy<Value = Vec<(&'static str, Vec<u8>)>> {
    proptest::sample::subsequence(OTHER_KEYS, 0..=OTHER_KEYS.len())
        .prop_shuffle()
        .prop_flat_map(|keys| {
            let n = keys.len();
            (Just(keys), proptest::collection::vec(bytes(), n))
        })
        .prop_map(|(keys, values)| keys.into_iter().zip(values).collect())
}

/// `-device usb-host,...` naming the device by bus+address or node: ours.
fn keyval_device() -> impl Strategy<Value = Piece> {
    (
        any::<bool>(),
        prop_oneof![
            (1u32..300, 1u32..300).prop_map(|(b, a)| format!("hostbus={b},hostaddr={a}")),
            (1u32..300, 1u32..300).prop_map(|(b, a)| format!("hostaddr=0x{a:x},hostbus=0{b:o}")),
            (1u32..9, 1u32..200)
                .prop_map(|(b, a)| format!("hostdevice=/dev/bus/usb/{b:03}/{a:03}")),
        ],
        extras(),
        0usize..6,
    )
        .prop_map(|(driver_key, selector, extras, at)| {
            let mut elements: Vec<Vec<u8>> = extras
                .into_iter()
                .map(|(key, value)| [key.as_bytes(), b"=", &keyval_escape(&value)].concat())
                .collect();
            elements.insert(at.min(elements.len()), selector.into_bytes());
            let driver: &[u8] = if driver_key {
                b"driver=usb-host"
            } else {
                b"usb-host"
            };
            elements.insert(0, driver.to_vec());
            Piece {
                words: vec![
                    "-device".into(),
                    OsString::from_vec(elements.join(&b","[..])),
                ],
                owned: true,
            }
        })
}

/// `-device {"driver":"usb-host",...}` naming the device by bus+address or node: ours.
fn json_device() -> impl Strategy<Value = Piece> {
    (
        prop_oneof![
            (1u32..300, 1u32..300).prop_map(|(b, a)| format!("\"hostbus\":{b},\"hostaddr\":{a}")),
            (1u32..9, 1u32..200)
                .prop_map(|(b, a)| format!("\"hostdevice\":\"/dev/bus/usb/{b:03}/{a:03}\"")),
        ],
        proptest::sample::subsequence(OTHER_KEYS, 0..=OTHER_KEYS.len()).prop_shuffle(),
        proptest::collection::vec(any::<String>(), OTHER_KEYS.len()),
        any::<bool>(),
    )
        .prop_map(|(selector, keys, values, spaced)| {
            let separator = if spaced { ", " } else { "," };
            let mut members = vec!["\"driver\":\"usb-host\"".to_string(), selector];
            for (key, value) in keys.into_iter().zip(values) {
                members.push(format!(
                    "\"{key}\":{}",
                    serde_json::Value::from(value.as_str())
                ));
            }
            Piece {
                words: vec![
                    "-device".into(),
                    format!("{{{}}}", members.join(separator)).into(),
                ],
                owned: true,
            }
        })
}

fn legacy_device() -> impl Strategy<Value = Piece> {
    prop_oneof![
        (1u32..300, 1u32..300).prop_map(|(b, a)| (format!("host:{b}.{a}"), true)),
        (any::<u16>(), any::<u16>()).prop_map(|(v, p)| (format!("host:{v:04x}:{p:04x}"), true)),
        Just(("host:auto:*.*:046d:c52b".to_string(), false)),
        Just(("tablet".to_string(), false)),
    ]
    .prop_map(|(value, owned)| Piece {
        words: vec!["-usbdevice".into(), value.into()],
        owned,
    })
}

/// Words the rewriter must not touch.
fn unrelated() -> impl Strategy<Value = Piece> {
    let piece = |words: Vec<OsString>| Piece {
        words,
        owned: false,
    };
    prop_oneof![
        proptest::sample::select(FLAGS).prop_map(move |flag| piece(vec![flag.into()])),
        // Any value, even one that spells a usb-host option: it is a value.
        (
            proptest::sample::select(VALUED),
            prop_oneof![
                bytes(),
                Just(b"-device".to_vec()),
                Just(b"usb-host,hostbus=1,hostaddr=5".to_vec()),
                Just(b"-usbdevice host:1.2".to_vec()),
            ]
        )
            .prop_map(move |(option, value)| piece(vec![option.into(), OsString::from_vec(value)])),
        // A positional word (a disk image): anything that does not start with '-'.
        bytes()
            .prop_filter("not an option", |w| w.first() != Some(&b'-'))
            .prop_map(move |w| piece(vec![OsString::from_vec(w)])),
        // Devices that are not usb-host, or usb-host devices that already reconnect.
        prop_oneof![
            bytes().prop_filter("no usb-host", |w| not_usb_host(w)),
            Just(b"usb-kbd,id=usb-host".to_vec()),
            Just(b"usb-host,vendorid=0x046d,productid=0xc52b".to_vec()),
            Just(b"usb-host,hostbus=1,hostport=2.3".to_vec()),
            Just(br#"{"driver":"usb-host","vendorid":1133,"productid":50475}"#.to_vec()),
        ]
        .prop_map(move |value| piece(vec!["-device".into(), OsString::from_vec(value)])),
    ]
}

fn argv() -> impl Strategy<Value = (Vec<OsString>, Vec<bool>)> {
    proptest::collection::vec(
        prop_oneof![
            4 => unrelated(),
            2 => keyval_device(),
            2 => json_device(),
            1 => legacy_device(),
        ],
        0..10,
    )
    .prop_map(|pieces| {
        let mut words = Vec::new();
        let mut owned = Vec::new();
        for piece in pieces {
            let last = piece.words.len() - 1;
            for (index, word) in piece.words.into_iter().enumerate() {
                words.push(word);
                owned.push(piece.owned && index == last);
            }
        }
        (words, owned)
    })
}

fn decision() -> impl Strategy<Value = Decision> {
    let facts = |hostport: Option<&str>| HostDeviceFacts {
        vendor_id: 0x046d,
        product_id: 0xc52b,
        bus: 1,
        hostport: hostport.map(str::to_string),
    };
    prop_oneof![
        Just(Decision::Keep),
        Just(Decision::Warn("gone".to_string())),
        Just(Decision::Rewrite {
            facts: facts(Some("2.3")),
            mode: ReconnectMode::Id
        }),
        Just(Decision::Rewrite {
            facts: facts(Some("2.3")),
            mode: ReconnectMode::Port
        }),
        Just(Decision::Rewrite {
            facts: facts(None),
            mode: ReconnectMode::Port
        }),
    ]
}

/// A QemuOpts word's elements, split at single commas (`,,` is an escaped comma).
fn keyval_elements(word: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new()];
    let mut position = 0;
    while position < word.len() {
        match (word[position], word.get(position + 1)) {
            (b',', Some(b',')) => {
                parts.last_mut().unwrap().extend_from_slice(b",,");
                position += 1;
            }
            (b',', _) => parts.push(Vec::new()),
            (b, _) => parts.last_mut().unwrap().push(b),
        }
        position += 1;
    }
    parts
}

fn is_selector_element(element: &[u8]) -> bool {
    SELECTOR_KEYS.iter().any(|key| {
        element
            .strip_prefix(key.as_bytes())
            .is_some_and(|r| r.first() == Some(&b'='))
    })
}

/// What a usb-host word says besides its selector, to compare before and after.
fn non_selector_part(word: &[u8]) -> Result<Vec<Vec<u8>>, TestCaseError> {
    if word.first() == Some(&b'{') {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(word)
            .map_err(|e| TestCaseError::fail(format!("rewritten json does not parse: {e}")))?;
        Ok(object
            .into_iter()
            .filter(|(key, _)| !SELECTOR_KEYS.contains(&key.as_str()))
            .map(|(key, value)| format!("{key}={value}").into_bytes())
            .collect())
    } else if word.starts_with(b"host:") {
        Ok(Vec::new())
    } else {
        Ok(keyval_elements(word)
            .into_iter()
            .filter(|element| !is_selector_element(element))
            .collect())
    }
}

proptest! {
    #![proptest_config(crate::config(512))]

    /// Only the usb-host arguments it owns change, each at most once and only when the
    /// caller said to rewrite it; every other word is the same bytes at the same place;
    /// a rewritten word keeps its other properties (in order, byte for byte in keyval).
    #[test]
    fn rewriter_keeps_every_word_it_does_not_own(
        (args, owned) in argv(),
        decisions in proptest::collection::vec(decision(), 16),
    ) {
        let mut asked = 0;
        let mut given = Vec::new();
        let (out, outcomes) = rewrite_args(&args, |_| {
            let decision = decisions[asked % decisions.len()].clone();
            asked += 1;
            given.push(decision.clone());
            decision
        });
        prop_assert_eq!(out.len(), args.len());
        let mut outcome_at = vec![None; args.len()];
        for outcome in &outcomes {
            let index = match outcome {
                Outcome::Rewritten { index, .. }
                | Outcome::Kept { index }
                | Outcome::Warned { index, .. }
                | Outcome::Unparsed { index, .. } => *index,
            };
            prop_assert!(owned[index], "outcome for a word it does not own: {:?}", outcome);
            prop_assert!(outcome_at[index].replace(outcome).is_none(), "two outcomes for {}", index);
        }
        // Each usb-host argument it owns was asked about once, in order.
        let owned_count = owned.iter().filter(|&&o| o).count();
        prop_assert_eq!(asked, owned_count);
        let mut answers = given.iter();
        for (index, (before, after)) in args.iter().zip(&out).enumerate() {
            let Some(outcome) = outcome_at[index] else {
                prop_assert!(!owned[index], "word {} not asked about", index);
                prop_assert_eq!(before.as_bytes(), after.as_bytes(), "word {} changed", index);
                continue;
            };
            let answer = answers.next().expect("one answer per owned word");
            match (outcome, answer) {
                (Outcome::Rewritten { before: was, after: now, .. }, Decision::Rewrite { .. }) => {
                    prop_assert_eq!(was, before);
                    prop_assert_eq!(now, after);
                    prop_assert_eq!(
                        non_selector_part(before.as_bytes())?,
                        non_selector_part(after.as_bytes())?
                    );
                }
                (Outcome::Kept { .. }, Decision::Keep) | (Outcome::Warned { .. }, Decision::Warn(_)) => {
                    prop_assert_eq!(before.as_bytes(), after.as_bytes());
                }
                (outcome, answer) => {
                    return Err(TestCaseError::fail(format!("{outcome:?} after {answer:?}")));
                }
            }
        }
    }
}
