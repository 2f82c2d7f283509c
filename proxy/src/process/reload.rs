//! Changing the running configuration: a reload of the file, or a snapshot the control plane
//! pushed, built and checked in full before it is published — or refused, changing nothing.

use super::*;

impl Server {
    /// Re-reads the config file and applies it if it is valid in full; otherwise nothing changes.
    pub fn reload(&mut self) -> Result<u64, ConfigErrors> {
        let metrics = self.shared.metrics.clone();
        let result = self.try_reload(&metrics);
        count_reload(&metrics, result.is_ok());
        result
    }

    pub(super) fn try_reload(&mut self, metrics: &Metrics) -> Result<u64, ConfigErrors> {
        let bootstrap = Config::from_file(&self.config_path)?;
        let merged = merge(&bootstrap, self.remote.as_ref().map(|(_, c)| c));
        let v = self.apply(merged, metrics)?;
        self.bootstrap = bootstrap;
        Ok(v)
    }

    /// Applies the control plane's snapshot `version` (with the bootstrap's static parts), as a
    /// reload does; on success it is saved as the last good one.
    pub fn apply_remote(
        &mut self,
        version: u64,
        config: Config,
        digest: &str,
    ) -> Result<u64, ConfigErrors> {
        let metrics = self.shared.metrics.clone();
        let merged = merge(&self.bootstrap, Some(&config));
        let result = self.apply(merged, &metrics);
        count_reload(&metrics, result.is_ok());
        if result.is_ok() {
            if let Some(c) = &self.control {
                crate::control::save_last_good(c, version, &config, digest);
            }
            self.remote = Some((version, config));
        }
        result
    }

    /// The control plane's version being served (0: none).
    pub fn remote_version(&self) -> u64 {
        self.remote.as_ref().map_or(0, |(v, _)| *v)
    }

    pub(super) fn apply(&mut self, config: Config, metrics: &Metrics) -> Result<u64, ConfigErrors> {
        let previous = self.shared.snapshot();
        // Filter modules are files of their own: an unchanged configuration may still name
        // changed code, so only one without filters is known unchanged without building it.
        if config == *previous.config && config.filters.is_empty() && config.services.is_empty() {
            return Ok(previous.version);
        }
        let version = previous.version + 1;
        let unchanged = config == *previous.config;
        let snapshot = Snapshot::build(
            config,
            version,
            Some(&previous),
            env(
                &self.config_path,
                metrics,
                &self.shared.wasm,
                self.control.as_ref().and_then(|c| c.identity.as_ref()),
            ),
        )?;
        if unchanged
            && snapshot.filters.len() == previous.filters.len()
            && snapshot
                .filters
                .iter()
                .all(|(k, f)| previous.filters.get(k).is_some_and(|p| Arc::ptr_eq(p, f)))
            && snapshot.services.len() == previous.services.len()
            && snapshot
                .services
                .iter()
                .all(|(k, s)| previous.services.get(k).is_some_and(|p| Arc::ptr_eq(p, s)))
        {
            return Ok(previous.version);
        }
        if snapshot.admin != previous.admin {
            return Err(ConfigError::new(
                "admin.address",
                "cannot change while running (restart weft to move the admin listener)",
            )
            .into());
        }
        if snapshot.config.wasm != previous.config.wasm {
            return Err(ConfigError::new(
                "wasm.pool_instances",
                "cannot change while running (restart weft to resize the VM pool)",
            )
            .into());
        }
        check_capacity(
            &snapshot,
            Some(&previous),
            self.workers.len(),
            &self.shared.wasm,
        )?;

        // Bind every new listener before anything changes, so a bind failure changes nothing.
        let mut fresh = Vec::new();
        for l in snapshot.bindings() {
            let requested = l.address;
            if self
                .bound
                .iter()
                .any(|b| b.name == l.name && b.requested == requested)
            {
                continue;
            }
            match self.bind(
                &l.name,
                requested,
                (l.max_connections, l.max_connections_per_source_ip),
            ) {
                Ok(b) => fresh.push(b),
                Err(e) => {
                    return Err(
                        ConfigError::new(l.at, format!("cannot bind {requested}: {e}")).into(),
                    );
                }
            }
        }
        let gone: Vec<usize> = self
            .bound
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                snapshot
                    .listeners
                    .get(&b.name)
                    .is_none_or(|l| l.address != b.requested)
            })
            .map(|(i, _)| i)
            .collect();

        let digest = snapshot.digest.clone();
        for b in &self.bound {
            if let Some(l) = snapshot.listeners.get(&b.name) {
                b.limit
                    .set_max(l.max_connections, l.max_connections_per_source_ip);
            }
        }
        // The admin API shows the listeners of a version no later than the version itself: a
        // client that sees the new version on /config finds its listeners on /listeners.
        self.publish_listing(
            self.bound
                .iter()
                .enumerate()
                .filter(|(i, _)| !gone.contains(i))
                .map(|(_, b)| b)
                .chain(fresh.iter().map(|(b, _, _)| b)),
        );
        self.shared.publish(Arc::new(snapshot));
        drop(previous);
        metrics.config_version.set(version as i64);
        // Modules only the configurations before the last one used are let go.
        crate::wasm::module::evict_unused();
        let loaded = crate::wasm::module::loaded_count();
        self.shared.wasm.stats.modules_loaded.set(loaded as i64);
        for i in gone.into_iter().rev() {
            let b = self.bound.remove(i);
            for w in &self.workers {
                let _ = w.commands.send(Command::Unlisten { id: b.id });
            }
            tracing::info!(name = %b.name, address = %b.local, "listener closed");
        }
        for (b, sockets, limit) in fresh {
            self.start_listening(b, sockets, limit);
        }
        self.publish_listeners();
        self.restart_maintenance();
        tracing::info!(version, %digest, "configuration applied");
        Ok(version)
    }
}
