//! Following one daemon: the reconnect loop with its backoff, each session (hello, sync,
//! then the event stream with inspects running ahead of it), and what each event changes in
//! the view and sends to the processing thread.

use super::*;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Bounds how long a returning daemon goes unnoticed.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// For the first requests of a connection. A daemon that is shutting down still accepts
/// connections on its socket but never answers them; waiting the full request timeout
/// there would keep the agent from seeing its successor for seconds.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

impl<M: From<DockerMsg> + Send> Join<M> {
    async fn send(&self, m: DockerMsg) -> bool {
        self.tx.send(m.into()).await.is_ok()
    }

    pub(super) async fn run(&mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut said_unavailable = false;
        loop {
            let end = tokio::select! {
                e = self.session() => e,
                _ = stop.changed() => return,
            };
            let (reason, was_connected) = end;
            if was_connected {
                backoff = BACKOFF_MIN;
            }
            // Once per outage: a daemon that stays away for a day is one line, not 40,000.
            if was_connected || !said_unavailable {
                said_unavailable = true;
                let m = DockerMsg::Unavailable {
                    endpoint: self.ep.to_string().into(),
                    reason: reason.to_string(),
                    ts_ns: now_ns(),
                };
                if !self.send(m).await {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connect, negotiate the API version and ask what the engine is, within HELLO_TIMEOUT.
    async fn hello(&self) -> Result<(Docker, &'static str, String), DockerError> {
        let unreachable = |source| DockerError::Unreachable {
            endpoint: self.ep.to_string(),
            source,
        };
        let docker = connect(&self.ep).map_err(unreachable)?;
        let hello = async {
            let docker = docker.negotiate_version().await?;
            let v = docker.version().await?;
            Ok::<_, bollard::errors::Error>((
                docker,
                engine_name(&v),
                v.version.unwrap_or_default(),
            ))
        };
        match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
            Ok(r) => r.map_err(unreachable),
            Err(_) => Err(unreachable(bollard::errors::Error::RequestTimeoutError)),
        }
    }

    /// One connection: connect, sync, follow events until the stream ends. Returns why it
    /// ended and whether it got as far as `connected`.
    async fn session(&mut self) -> (DockerError, bool) {
        let started = Instant::now();
        let (docker, engine, server_version) = match self.hello().await {
            Ok(v) => v,
            Err(e) => return (e, false),
        };
        // Events from here on are replayed by the stream below: nothing between the list
        // and the subscription is missed.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (cgroup_mode, cgroup2) = cgroup_layout();
        self.cgroup2 = cgroup2;
        self.engine = engine;
        let containers = match self.sync(&docker).await {
            Ok(c) => c,
            Err(e) => return (e, false),
        };
        let missed = self.adopt(&containers);
        let connected = Connected {
            endpoint: self.ep.to_string().into(),
            engine,
            api_version: docker.client_version().to_string(),
            server_version,
            containers,
            sync_ms: started.elapsed().as_millis() as u64,
            cgroup: cgroup_mode,
            ts_ns: now_ns(),
        };
        if !self.send(DockerMsg::Connected(Box::new(connected))).await {
            return (DockerError::Stopped, true);
        }
        for m in missed {
            if !self.send(m).await {
                return (DockerError::Stopped, true);
            }
        }

        let filters = HashMap::from([(
            "type".to_string(),
            vec!["container".to_string(), "network".to_string()],
        )]);
        let opts = EventsOptions {
            since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
            filters: Some(filters),
            ..Default::default()
        };
        // Inspects run ahead, PARALLEL at a time; `buffered` hands the results back in the
        // order of the events, which the loop below applies one by one.
        let insp = self.inspector(&docker);
        let mut events = Box::pin(
            docker
                .events(Some(opts))
                .map(move |ev| {
                    let insp = insp.clone();
                    async move {
                        let ev = ev?;
                        let pre = insp.prepare(&ev).await;
                        Ok::<_, bollard::errors::Error>((ev, pre))
                    }
                })
                .buffered(PARALLEL),
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok((ev, pre))) => {
                        if !self.on_event(ev, pre).await {
                            return (DockerError::Stopped, true);
                        }
                    }
                    Some(Err(e)) => {
                        return (DockerError::StreamEnded { endpoint: self.ep.to_string(), why: e.to_string() }, true)
                    }
                    None => {
                        return (DockerError::StreamEnded { endpoint: self.ep.to_string(), why: "closed by the daemon".into() }, true)
                    }
                },
                _ = tick.tick() => {
                    if !self.send(DockerMsg::Tick).await {
                        return (DockerError::Stopped, true);
                    }
                }
            }
        }
    }

    /// False when the processing thread is gone.
    async fn on_event(&mut self, ev: EventMessage, pre: Inspected) -> bool {
        let ts_ns = ev.time_nano.map(i128::from).unwrap_or_else(now_ns);
        let action = ev.action.as_deref().unwrap_or("");
        let attrs = ev.actor.as_ref().and_then(|a| a.attributes.as_ref());
        trace(format_args!(
            "event {:?} {action} {:?}",
            ev.typ,
            ev.actor.as_ref().and_then(|a| a.id.as_deref())
        ));
        match ev.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                let Some(id) = ev.actor.as_ref().and_then(|a| a.id.as_deref()) else {
                    return true;
                };
                match action {
                    "create" | "rename" | "update" => {
                        if let Some((c, _)) = pre {
                            self.track(c.clone(), None);
                            return self.send(DockerMsg::Upsert(c)).await;
                        }
                    }
                    "start" => {
                        let Some((c, _)) = pre else {
                            return true;
                        };
                        // A restart policy's restart, or a replay: say it once.
                        let first = !self.view.get(id).is_some_and(|t| t.announced_running);
                        self.track(c.clone(), Some(true));
                        let m = if first && c.state.is_live() {
                            lifecycle("start", c, None, ts_ns, false)
                        } else {
                            DockerMsg::Upsert(c)
                        };
                        return self.send(m).await;
                    }
                    "die" => {
                        let exit_code = attrs
                            .and_then(|a| a.get("exitCode"))
                            .and_then(|s| s.parse().ok());
                        let Some(t) = self.view.get_mut(id) else {
                            return true;
                        };
                        let mut c = (*t.c).clone();
                        c.state = State::Exited;
                        c.pid = 0;
                        c.netns = None;
                        c.cgroup_id = None;
                        let c = Arc::new(c);
                        let was = t.announced_running;
                        t.c = c.clone();
                        t.announced_running = false;
                        let m = if was {
                            lifecycle("die", c, exit_code, ts_ns, false)
                        } else {
                            DockerMsg::Upsert(c)
                        };
                        return self.send(m).await;
                    }
                    "destroy" => {
                        if let Some(t) = self.view.remove(id) {
                            return self
                                .send(lifecycle("destroy", t.c, None, ts_ns, false))
                                .await;
                        }
                    }
                    _ => {}
                }
            }
            Some(EventMessageTypeEnum::NETWORK) => {
                // Only disconnects are inspected (see Inspector::prepare).
                let (Some(id), Some((mut c, error))) =
                    (attrs.and_then(|a| a.get("container")), pre)
                else {
                    return true;
                };
                if !c.state.is_live() {
                    if let Some(prev) = self.view.get(id.as_str()) {
                        c = Arc::new(keep_ports(&c, &prev.c));
                    }
                    self.track(c.clone(), None);
                    if let Some(error) = error {
                        return self
                            .send(DockerMsg::StartFailed {
                                container: c,
                                error,
                                ts_ns,
                            })
                            .await;
                    }
                    return self.send(DockerMsg::Upsert(c)).await;
                }
                self.track(c.clone(), None);
                return self.send(DockerMsg::Upsert(c)).await;
            }
            _ => {}
        }
        true
    }

    fn track(&mut self, c: Arc<Container>, running: Option<bool>) {
        let live = c.state.is_live();
        let t = self.view.entry(c.full_id.clone()).or_insert(Tracked {
            c: c.clone(),
            announced_running: false,
        });
        t.c = c;
        if let Some(r) = running {
            t.announced_running = r && live;
        }
    }
}
