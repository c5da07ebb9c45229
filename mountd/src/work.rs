//! Background and maintenance work (gc, scrub, fsck): which task runs now and how far it got,
//! and how each one last ended. `volfs status` and /metrics read it; nothing here is
//! persisted (a restarted daemon starts with no history). One run per task at a time: a
//! second request while one runs is refused with a message that says how far the first is.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use volfs::api::{self, BackgroundTask};
use volfs::meta::Ts;
use volfs::progress::Progress;
use volfs::{Error, Result};

use crate::metrics::Metrics;

struct Running {
    started: i64,
    progress: Arc<Progress>,
}

struct Finished {
    ended: i64,
    millis: u64,
    outcome: String,
    ok: bool,
}

#[derive(Default)]
struct TaskState {
    running: Option<Running>,
    last: Option<Finished>,
    interval_secs: u64,
}

pub struct Work {
    tasks: Mutex<BTreeMap<&'static str, TaskState>>,
    metrics: Arc<Metrics>,
}

impl Work {
    /// `schedule`: the tasks that also run by themselves, with their interval (0 = off).
    pub fn new(metrics: Arc<Metrics>, schedule: &[(&'static str, u64)]) -> Work {
        let mut tasks = BTreeMap::new();
        for (name, interval_secs) in schedule {
            tasks.insert(
                *name,
                TaskState {
                    interval_secs: *interval_secs,
                    ..Default::default()
                },
            );
        }
        Work {
            tasks: Mutex::new(tasks),
            metrics,
        }
    }

    /// Runs `f` as task `task`, publishing its progress while it runs and its outcome after
    /// (`summary` describes a success in a few words). Failures are logged with the task.
    pub fn run<T>(
        &self,
        task: &'static str,
        f: impl FnOnce(&Progress) -> Result<T>,
        summary: impl FnOnce(&T) -> String,
    ) -> Result<T> {
        let progress = Arc::new(Progress::default());
        {
            let mut tasks = self.tasks.lock();
            let st = tasks.entry(task).or_default();
            if let Some(r) = &st.running {
                return Err(Error::Busy(format!(
                    "{task} is already running ({}, started {})",
                    r.progress.view().describe(),
                    api::rfc3339(r.started)
                )));
            }
            st.running = Some(Running {
                started: Ts::now().secs,
                progress: progress.clone(),
            });
        }
        let t0 = Instant::now();
        let result = f(&progress);
        let (ok, outcome) = match &result {
            Ok(v) => (true, summary(v)),
            Err(e) => {
                tracing::error!(op = task, "{task} failed: {e}");
                (false, format!("failed: {e}"))
            }
        };
        self.metrics.run_finished(task, ok);
        let mut tasks = self.tasks.lock();
        let st = tasks.entry(task).or_default();
        st.running = None;
        st.last = Some(Finished {
            ended: Ts::now().secs,
            millis: t0.elapsed().as_millis() as u64,
            outcome,
            ok,
        });
        result
    }

    pub fn view(&self) -> Vec<BackgroundTask> {
        self.tasks
            .lock()
            .iter()
            .map(|(name, st)| BackgroundTask {
                task: name.to_string(),
                running: st.running.is_some(),
                started: st.running.as_ref().map(|r| api::rfc3339(r.started)),
                progress: st.running.as_ref().map(|r| r.progress.view()),
                interval_secs: st.interval_secs,
                last_finished: st.last.as_ref().map(|l| api::rfc3339(l.ended)),
                last_millis: st.last.as_ref().map(|l| l.millis),
                last_outcome: st.last.as_ref().map(|l| l.outcome.clone()),
                last_ok: st.last.as_ref().map(|l| l.ok),
            })
            .collect()
    }
}
