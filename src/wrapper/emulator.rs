//! Finding the real emulator the wrapper stands in for, and never the wrapper itself.

use super::settings::{Settings, DEFAULT_SETTINGS_PATH, ENV_EMULATOR};
use super::WRAPPER_NAME;
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the real emulator is when nothing else says.
pub(super) const DEFAULT_EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

/// A file's device and inode numbers.
pub type FileIdentity = (u64, u64);

/// A file's identity, so that the wrapper can tell itself apart from a real emulator
/// however many symlinks lead to either.
pub fn identity(path: &Path) -> Option<FileIdentity> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the real emulator: `USBPASS_QEMU`, then the settings file, then a binary named
/// like argv[0] further along PATH than the wrapper, then the default. A candidate that
/// is the wrapper itself is skipped with a warning: execing it would loop forever.
pub(super) fn find_emulator(
    settings: &Settings,
    argv0: &OsStr,
    path_var: Option<&OsStr>,
    self_identity: Option<FileIdentity>,
    default: &Path,
    warnings: &mut Vec<String>,
) -> Option<PathBuf> {
    let is_self =
        |candidate: &Path| self_identity.is_some() && identity(candidate) == self_identity;
    if let Some(configured) = &settings.emulator {
        if is_self(configured) {
            warnings.push(format!(
                "emulator {} is usbpass-qemu itself, ignoring it",
                configured.display()
            ));
        } else if is_executable_file(configured) {
            return Some(configured.clone());
        } else {
            warnings.push(format!(
                "emulator {} is no executable file, ignoring it",
                configured.display()
            ));
        }
    }
    let name = Path::new(argv0).file_name();
    if let (Some(name), Some(path_var)) = (name, path_var) {
        if name != OsStr::new(WRAPPER_NAME) {
            let folders: Vec<PathBuf> = std::env::split_paths(path_var)
                .filter(|folder| folder.is_absolute())
                .collect();
            // The wrapper's own entry: the first folder where argv[0]'s name is the
            // wrapper, or argv[0]'s own folder when the wrapper cannot know itself.
            let own_folder = Path::new(argv0)
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .and_then(identity);
            let own_entry = folders.iter().position(|folder| {
                is_self(&folder.join(name))
                    || own_folder.is_some_and(|own| identity(folder) == Some(own))
            });
            // "Past the wrapper" only: an entry before it would shadow the wrapper for
            // anyone looking the name up, so it is not the binary the wrapper stands in
            // for, and wrapping around to it could pick another wrapper.
            match own_entry {
                Some(position) => {
                    for folder in &folders[position + 1..] {
                        let candidate = folder.join(name);
                        if !is_self(&candidate) && is_executable_file(&candidate) {
                            return Some(candidate);
                        }
                    }
                }
                None => warnings.push(format!(
                    "{} is not on PATH, so no PATH entry is past it; falling back to the default emulator",
                    Path::new(argv0).display()
                )),
            }
        }
    }
    if is_self(default) {
        warnings.push(format!(
            "default emulator {} is usbpass-qemu itself; set {ENV_EMULATOR} or emulator= in {DEFAULT_SETTINGS_PATH}",
            default.display()
        ));
        return None;
    }
    Some(default.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn executable(path: &Path) {
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn emulator_order_and_never_self() {
        let dir = tempfile::tempdir().unwrap();
        let (first, wrapper_dir, later) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&first, &wrapper_dir, &later] {
            fs::create_dir(d).unwrap();
        }
        let wrapper = wrapper_dir.join("usbpass-qemu");
        executable(&wrapper);
        std::os::unix::fs::symlink(&wrapper, wrapper_dir.join("qemu-kvm")).unwrap();
        executable(&first.join("qemu-kvm"));
        executable(&later.join("qemu-kvm"));
        let me = identity(&wrapper);
        let path_var = std::env::join_paths([&first, &wrapper_dir, &later]).unwrap();
        let argv0 = wrapper_dir.join("qemu-kvm");
        let default = Path::new("/nonexistent/qemu");
        let mut warnings = Vec::new();
        let search = |settings: &Settings,
                      argv0: &OsStr,
                      path_var: Option<&OsStr>,
                      warnings: &mut Vec<String>| {
            find_emulator(settings, argv0, path_var, me, default, warnings)
        };

        // PATH: the entry past the wrapper wins over the one before it.
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&path_var),
            &mut warnings,
        );
        assert_eq!(found, Some(later.join("qemu-kvm")));

        // USBPASS_QEMU (or the settings file) first, unless it is the wrapper itself.
        let configured = Settings {
            emulator: Some(first.join("qemu-kvm")),
            ..Settings::default()
        };
        let found = search(
            &configured,
            argv0.as_os_str(),
            Some(&path_var),
            &mut warnings,
        );
        assert_eq!(found, Some(first.join("qemu-kvm")));
        let looping = Settings {
            emulator: Some(wrapper_dir.join("qemu-kvm")),
            ..Settings::default()
        };
        let found = search(&looping, argv0.as_os_str(), Some(&path_var), &mut warnings);
        assert_eq!(found, Some(later.join("qemu-kvm")));
        assert!(warnings
            .iter()
            .any(|w| w.contains("is usbpass-qemu itself")));

        // Called by its own name: no PATH search, the default.
        let found = search(
            &Settings::default(),
            wrapper.as_os_str(),
            Some(&path_var),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));

        // Nothing past the wrapper's entry: the entry before it does not count (no
        // wrap-around); the default runs.
        let wrapper_last = std::env::join_paths([&first, &wrapper_dir]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&wrapper_last),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));

        // Another symlink to the wrapper past its entry is skipped, never exec'd.
        let second_link = dir.path().join("d");
        fs::create_dir(&second_link).unwrap();
        std::os::unix::fs::symlink(&wrapper, second_link.join("qemu-kvm")).unwrap();
        let twice = std::env::join_paths([&first, &wrapper_dir, &second_link, &later]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&twice),
            &mut warnings,
        );
        assert_eq!(found, Some(later.join("qemu-kvm")));
        let twice_last = std::env::join_paths([&first, &wrapper_dir, &second_link]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&twice_last),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));

        // The wrapper's folder is not on PATH: nothing is past it, so no PATH entry
        // counts; the default runs and a warning says why.
        warnings.clear();
        let elsewhere = std::env::join_paths([&first, &later]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&elsewhere),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("not on PATH"), "{warnings:?}");

        // Without the wrapper's identity (no /proc/self/exe), argv[0]'s folder still
        // marks its entry.
        let found = find_emulator(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&path_var),
            None,
            default,
            &mut warnings,
        );
        assert_eq!(found, Some(later.join("qemu-kvm")));

        // The default is the wrapper: nothing to run.
        let found = find_emulator(
            &Settings::default(),
            wrapper.as_os_str(),
            None,
            me,
            &wrapper,
            &mut warnings,
        );
        assert_eq!(found, None);
    }
}
