//! The rules-file corpus: every file under `tests/rules-corpus/good` must load, and every
//! file under `bad` must fail at the line and column its first line names
//! (`# error: LINE:COL: TEXT`), with TEXT in the message. `usbpass check` is run on
//! each file too: exit status, and exactly one line on stderr naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;
use usbpass::rules::Config;

fn corpus(kind: &str) -> Vec<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/rules-corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "corpus {kind} is too small: {files:?}");
    files
}

fn check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_usbpass"))
        .arg("--config")
        .arg(path)
        .arg("check")
        .output()
        .unwrap()
}

#[test]
fn good_files_load_and_pass_check() {
    for path in corpus("good") {
        if let Err(error) = Config::load(&path) {
            panic!("{}: {error}", path.display());
        }
        let output = check(&path);
        assert!(output.status.success(), "{}: {output:?}", path.display());
    }
}

#[test]
fn bad_files_fail_at_the_named_location() {
    let mut failures = Vec::new();
    for path in corpus("bad") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("# error: "))
            .unwrap_or_else(|| panic!("{} has no `# error:` header", path.display()));
        let (location, wanted_text) = match expected.splitn(3, ':').collect::<Vec<_>>()[..] {
            [line, column, text] => (
                (
                    line.parse::<usize>().unwrap(),
                    column.parse::<usize>().unwrap(),
                ),
                text.trim(),
            ),
            _ => panic!("{}: bad header {expected:?}", path.display()),
        };
        let error = match Config::load(&path) {
            Ok(_) => {
                failures.push(format!("{}: loaded, expected an error", path.display()));
                continue;
            }
            Err(error) => error,
        };
        let message = error.to_string();
        if error.location() != Some(location) || !message.contains(wanted_text) {
            failures.push(format!(
                "{}: expected {location:?} {wanted_text:?}, got {:?} {message:?}",
                path.display(),
                error.location()
            ));
        }
        let prefix = format!("{}:{}:{}: ", path.display(), location.0, location.1);
        if !message.starts_with(&prefix) || message.contains('\n') || message.ends_with('.') {
            failures.push(format!("{}: message shape: {message:?}", path.display()));
        }
        let output = check(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() || stderr.lines().count() != 1 || !stderr.contains(&prefix) {
            failures.push(format!(
                "{}: usbpass check gave {:?} {stderr:?}",
                path.display(),
                output.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_missing_file_is_one_clear_line() {
    let output = check(Path::new("/nonexistent/usbpass.toml"));
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "usbpass: cannot read rules file /nonexistent/usbpass.toml: No such file or directory (os error 2)\n"
    );
}
