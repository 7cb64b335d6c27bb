//! Writing records: the log and stdout, the attach window and its fan-out to clients.

use super::*;

impl Processor {
    /// A record at log level: stdout, the log file, the window and attached clients.
    /// Write a record, count it, send it to attached clients and keep it for replay. Metrics
    /// and filters read its keys from the typed value, never from the line.
    pub(super) fn emit(&mut self, r: &Record) {
        self.buf.clear();
        if serde_json::to_writer(&mut self.buf, r).is_err() {
            self.failed_encodes += 1;
            return;
        }
        self.buf.push(b'\n');
        self.out.write_line(&self.buf);
        let line: Arc<[u8]> = Arc::from(&self.buf[..]);
        let keys = Arc::new(Keys::of_record(r));
        if let Some(m) = &self.cfg.metrics {
            m.record(&keys);
        }
        self.publish(&line, &keys);
        self.push_window(WinItem::Line(Clock::now_wall_ns(), line, keys));
    }

    /// Write out what the last message produced, and report log-file trouble it met.
    pub(super) fn flush(&mut self) {
        // A report may itself produce a line (log_resumed); two rounds settle it.
        for _ in 0..2 {
            let ev = self.out.flush();
            if ev == LogEvent::Ok {
                break;
            }
            self.log_event(ev);
        }
    }

    /// Report log-file trouble: on stdout (the log may be what is failing) and to clients.
    pub(super) fn log_event(&mut self, ev: LogEvent) {
        match ev {
            LogEvent::Ok | LogEvent::StillFailing => {}
            LogEvent::Failed(reason) => {
                eprintln!(
                    "portwatch: warning: {reason}; records still go to stdout, failed writes are \
                     counted, and writing resumes when it can"
                );
                let r = AgentRecord {
                    reason: Some(reason),
                    ..AgentRecord::new(AgentEvent::LogError)
                };
                let line = record::record(&self.host, Clock::now_wall_ns(), Body::Agent(r));
                self.buf.clear();
                if serde_json::to_writer(&mut self.buf, &line).is_ok() {
                    self.buf.push(b'\n');
                    let buf = std::mem::take(&mut self.buf);
                    self.out.stdout_line(&buf);
                    let l: Arc<[u8]> = Arc::from(&buf[..]);
                    self.publish(&l, &Keys::of("agent"));
                    self.buf = buf;
                }
            }
            LogEvent::Resumed { failed } => {
                let r = AgentRecord {
                    failed_records: Some(failed),
                    log_file: self
                        .out
                        .log
                        .as_ref()
                        .map(|l| l.path().display().to_string()),
                    ..AgentRecord::new(AgentEvent::LogResumed)
                };
                self.emit_body(Clock::now_wall_ns(), Body::Agent(r));
            }
        }
    }

    pub(super) fn push_window(&mut self, item: WinItem) {
        let horizon = item.wall() - i128::from(self.cfg.window_s) * 1_000_000_000;
        let cost = item.cost();
        while self.window.front().is_some_and(|f| {
            f.wall() < horizon
                || self.window.len() >= WINDOW_ITEMS
                || self.window_bytes + cost > WINDOW_BYTES
        }) {
            if let Some(f) = self.window.pop_front() {
                self.window_bytes -= f.cost();
            }
        }
        self.window_bytes += cost;
        self.window.push_back(item);
    }

    /// Whether any attached client filters: only then are a verbose event's keys worth
    /// building (an empty filter matches without looking at them).
    pub(super) fn any_filter(&self) -> bool {
        self.subs.iter().any(|s| !s.filter.is_empty())
    }

    /// Send a line to every attached client whose filter matches. A client that does not
    /// keep up loses lines (counted, and told how many) instead of slowing the agent.
    pub(super) fn publish(&mut self, line: &Arc<[u8]>, keys: &Keys) {
        if self.subs.is_empty() {
            return;
        }
        for s in &mut self.subs {
            if !s.filter.matches_keys(keys) {
                continue;
            }
            if s.missed > 0 {
                let note = format!("{{\"v\":1,\"type\":\"missed\",\"count\":{}}}\n", s.missed);
                match s.tx.try_send(Arc::from(note.as_bytes())) {
                    Ok(()) => s.missed = 0,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.missed += 1;
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        s.closed = true;
                        continue;
                    }
                }
            }
            match s.tx.try_send(line.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => s.missed += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => s.closed = true,
            }
        }
        self.subs.retain(|s| !s.closed);
        self.cfg
            .attach_clients
            .store(self.subs.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// `body` with the common header (`ts` from `wall`), written as `emit` writes.
    pub(super) fn emit_body(&mut self, wall: i128, body: Body) {
        let r = record::record(&self.host, wall, body);
        self.emit(&r);
    }

    /// `attach`: the matching recent past, then register for live records. Done here, in
    /// stream order, so the replay and the live stream neither overlap nor leave a gap.
    pub(super) fn attach(
        &mut self,
        filter: Filter,
        since_s: u64,
        live: mpsc::Sender<Arc<[u8]>>,
        reply: oneshot::Sender<Vec<Arc<[u8]>>>,
    ) {
        let from = Clock::now_wall_ns() - i128::from(since_s) * 1_000_000_000;
        let mut out = Vec::new();
        let items: Vec<WinItem> = self
            .window
            .iter()
            .filter(|i| since_s > 0 && i.wall() >= from)
            .cloned()
            .collect();
        for item in items {
            match item {
                WinItem::Line(_, l, keys) => {
                    if filter.matches_keys(&keys) {
                        out.push(l);
                    }
                }
                WinItem::Raw(w, e, ns) => {
                    let Ok(k) = Kind::try_from(e.kind) else {
                        continue;
                    };
                    if let Some(keys) = self.format_verbose(&e, k, ns, w, !filter.is_empty()) {
                        if filter.matches_keys(&keys) {
                            out.push(Arc::from(&self.buf[..]));
                        }
                    }
                }
            }
        }
        let _ = reply.send(out);
        self.subs.push(Sub {
            filter,
            tx: live,
            missed: 0,
            closed: false,
        });
        self.cfg
            .attach_clients
            .store(self.subs.len(), std::sync::atomic::Ordering::Relaxed);
    }
}
