//! The loop's side of the rules file: reloading it on a change or SIGHUP, and keeping
//! the previous rules in force, with the reason shown, when the new text cannot serve.

use super::*;

impl<C: Connector, S: DeviceSource, K: Clock> Daemon<C, S, K> {
    pub(super) fn reload_config(&mut self, forced: bool) {
        // An empty file is a writer caught between create (or truncate) and its first
        // write: `rm` then `cat >`, `touch` then an edit. It parses as zero rules, and
        // applying it would detach every device only to attach them again a moment
        // later. The previous rules stay until the file has content; a file meant to
        // hold no rules says so with a comment.
        if std::fs::metadata(&self.options.config_path).is_ok_and(|file| file.len() == 0) {
            let message = format!(
                "rules file {} is empty: keeping the previous {} rules until it has content",
                self.options.config_path.display(),
                self.config.rules.len()
            );
            if self.config_error.as_deref() != Some(message.as_str()) {
                log::warn!("{message}");
            }
            self.config_error = Some(message);
            return;
        }
        match Config::load(&self.options.config_path) {
            Ok(config) => {
                // Rules the device source cannot serve are refused like a broken file.
                if let Err(refusal) = self.device_source.accepts(&config) {
                    self.refuse_config(refusal.to_string());
                    return;
                }
                if forced || config != self.config {
                    log::info!(
                        "rules reloaded from {}: {} rules",
                        config.path.display(),
                        config.rules.len()
                    );
                }
                if config.uri != self.config.uri {
                    log::info!("libvirt uri changed to {}: reconnecting", config.uri);
                    self.drop_connection("uri changed".to_string());
                    self.connection.connect_at_once(self.clock.now());
                }
                self.config = config;
                self.config_error = None;
                self.forget_unfollowed_rules();
                self.retries.clear();
            }
            // A file mid-save can be briefly absent; the final write brings another event.
            Err(ConfigError::ReadFile { source, .. })
                if !forced && source.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => self.refuse_config(error.to_string()),
        }
    }

    /// Keeps the previous rules in force and says why, once per distinct reason.
    pub(super) fn refuse_config(&mut self, message: String) {
        if self.config_error.as_deref() != Some(message.as_str()) {
            log::error!("{message}; keeping the previous rules");
        }
        self.config_error = Some(message);
    }
}
