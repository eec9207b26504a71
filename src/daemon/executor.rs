//! Carries out libvirt calls off the loop's thread and hands back what happened as
//! plain data, as `Event::CallFinished` on the loop's one channel. The loop decides and
//! books the outcome; the executor only calls, and reads and changes none of the loop's
//! state.
//!
//! Each VM's attaches and detaches run on that VM's worker thread, in the order they
//! were issued; the worker is started on the VM's first call and serves its calls
//! while the loop is busy. When the loop has nothing left to wait for, workers with no
//! call left are retired (their stacks, deepened by libvirt's RPC code, go back to the
//! kernel), and a VM's next call starts a new one: a thread start is microseconds
//! against a call's hundreds of milliseconds, and a retired worker had no call left,
//! so two workers of one VM never call at once. A VM whose QEMU does not answer holds
//! up only its own worker. Listings and connects are rare and
//! run on a thread of their own each, which exits when the call returns. A call cannot
//! be cancelled; the loop gives up waiting at its deadline and books the real answer
//! whenever it comes.

use crate::event::{Event, EventSender};
use crate::hypervisor::{
    Connector, FailureKind, HostdevSpec, Hypervisor, HypervisorError, RunningDomains,
};
use crate::reconcile::Action;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One action carried out: the action, when its call began and how long it took, and
/// libvirt's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionOutcome {
    pub action: Action,
    /// Decision times end here.
    pub started: Instant,
    pub call_time: Duration,
    pub result: Result<(), HypervisorError>,
}

/// The times are the system's monotonic clock, not the loop's: they measure a call,
/// they schedule nothing.
pub fn execute<H: Hypervisor>(hypervisor: &H, action: Action) -> ActionOutcome {
    let started = Instant::now();
    let result = match &action {
        Action::Attach {
            domain,
            device,
            alias,
            ..
        } => hypervisor.attach(domain, &HostdevSpec::new(device, alias.clone())),
        Action::Detach { domain, alias, .. } => hypervisor.detach(domain, alias),
    };
    ActionOutcome {
        action,
        started,
        call_time: started.elapsed(),
        result,
    }
}

/// Which call an outcome answers: numbered by the executor, unique for the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// What a call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    Action(ActionOutcome),
    Listing(Result<RunningDomains, HypervisorError>),
    /// A connect returned; the connection (or the error) waits in its `Opened` slot.
    Connected,
}

/// Where connect threads leave what they opened, by call, for the loop to take: a
/// connection is no plain data and does not travel in an `Event`.
pub type Opened<H> = Arc<Mutex<HashMap<CallId, Result<H, HypervisorError>>>>;

/// A call that returned, as the loop receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFinished {
    pub call: CallId,
    pub outcome: CallOutcome,
}

/// Calls issued and answered so far: the loop's tests wait on these to know that
/// every call that could answer has answered.
#[derive(Debug, Default)]
pub struct CallCounts {
    issued: AtomicU64,
    answered: AtomicU64,
}

impl CallCounts {
    /// (issued, answered): an answer counts once its event is on the channel.
    pub fn get(&self) -> (u64, u64) {
        (
            self.issued.load(Ordering::SeqCst),
            self.answered.load(Ordering::SeqCst),
        )
    }
}

/// One call, ready to run on whichever thread takes it.
type Job = Box<dyn FnOnce() + Send>;

/// Starts calls off the loop's thread; their outcomes come back on `events`.
pub struct Executor {
    events: EventSender,
    next_call: u64,
    counts: Arc<CallCounts>,
    /// Each VM's worker, by VM name.
    workers: HashMap<String, Worker>,
}

/// A VM's worker thread: where its calls go, and how many it has not finished.
struct Worker {
    jobs: Sender<Job>,
    unfinished: Arc<AtomicU64>,
}

impl Executor {
    pub fn new(events: EventSender) -> Executor {
        Executor {
            events,
            next_call: 0,
            counts: Arc::default(),
            workers: HashMap::new(),
        }
    }

    /// The VM stopped: its worker exits once its calls are done.
    pub fn forget_vm(&mut self, domain: &str) {
        self.workers.remove(domain);
    }

    /// Lets every worker that has finished all its calls exit (the loop calls this when
    /// it is about to sleep with nothing to wait for).
    pub fn retire_idle_workers(&mut self) {
        self.workers
            .retain(|_, worker| worker.unfinished.load(Ordering::SeqCst) > 0);
    }

    pub fn counts(&self) -> Arc<CallCounts> {
        self.counts.clone()
    }

    /// Carries out `action` through `hypervisor` off the loop's thread.
    pub fn start_action<H: Hypervisor>(&mut self, hypervisor: Arc<H>, action: Action) -> CallId {
        let failed = action.clone();
        let worker = action.domain().to_string();
        self.start(
            Some(worker),
            move |_| CallOutcome::Action(execute(&*hypervisor, action)),
            move |_, message| {
                let error = match &failed {
                    Action::Attach {
                        domain,
                        device,
                        alias,
                        ..
                    } => HypervisorError::Attach {
                        domain: domain.clone(),
                        device: HostdevSpec::new(device, alias.clone()).to_string(),
                        kind: FailureKind::Other,
                        message,
                    },
                    Action::Detach { domain, alias, .. } => HypervisorError::Detach {
                        domain: domain.clone(),
                        alias: alias.to_string(),
                        kind: FailureKind::Other,
                        message,
                    },
                };
                CallOutcome::Action(ActionOutcome {
                    action: failed,
                    started: Instant::now(),
                    call_time: Duration::ZERO,
                    result: Err(error),
                })
            },
        )
    }

    /// Lists the running domains and their live XML off the loop's thread.
    pub fn start_listing<H: Hypervisor>(&mut self, hypervisor: Arc<H>) -> CallId {
        self.start(
            None,
            move |_| CallOutcome::Listing(hypervisor.list_running()),
            |_, message| {
                CallOutcome::Listing(Err(HypervisorError::ListDomains {
                    kind: FailureKind::Other,
                    message,
                }))
            },
        )
    }

    /// Opens a connection to `uri` off the loop's thread, and leaves it in `opened`.
    pub fn start_connect<C: Connector>(
        &mut self,
        connector: Arc<C>,
        uri: &str,
        events: EventSender,
        opened: Opened<C::Hypervisor>,
    ) -> CallId {
        let slot = opened.clone();
        let (uri, refused_uri) = (uri.to_string(), uri.to_string());
        self.start(
            None,
            move |call| {
                let result = connector.connect(&uri, events);
                lock(&slot).insert(call, result);
                CallOutcome::Connected
            },
            move |call, message| {
                let error = HypervisorError::Connect {
                    uri: refused_uri,
                    message,
                };
                lock(&opened).insert(call, Err(error));
                CallOutcome::Connected
            },
        )
    }

    /// Runs `call` on `worker`'s thread, or on a new one, and sends its outcome. A
    /// call no thread can be started for is answered at once with `refused`'s outcome,
    /// so the loop books it like any failed call.
    fn start(
        &mut self,
        worker: Option<String>,
        call: impl FnOnce(CallId) -> CallOutcome + Send + 'static,
        refused: impl FnOnce(CallId, String) -> CallOutcome,
    ) -> CallId {
        self.next_call += 1;
        let id = CallId(self.next_call);
        self.counts.issued.fetch_add(1, Ordering::SeqCst);
        let events = self.events.clone();
        let counts = self.counts.clone();
        let job: Job = Box::new(move || {
            let outcome = call(id);
            // The loop gone means the daemon is stopping: nobody is left to tell.
            let _ = events.send(Event::CallFinished(Box::new(CallFinished {
                call: id,
                outcome,
            })));
            counts.answered.fetch_add(1, Ordering::SeqCst);
        });
        let started = match worker {
            Some(vm) => self.hand_to_worker(vm, job),
            None => std::thread::Builder::new()
                .name("usbpass-call".into())
                .spawn(job)
                .map(drop),
        };
        if let Err(error) = started {
            let outcome = refused(id, format!("cannot start a thread for the call: {error}"));
            let _ = self.events.send(Event::CallFinished(Box::new(CallFinished {
                call: id,
                outcome,
            })));
            self.counts.answered.fetch_add(1, Ordering::SeqCst);
        }
        id
    }

    /// Queues `job` on the VM's worker, starting one if it has none (or its last one
    /// is gone).
    fn hand_to_worker(&mut self, vm: String, job: Job) -> std::io::Result<()> {
        let job = match self.workers.get(&vm) {
            Some(worker) => {
                worker.unfinished.fetch_add(1, Ordering::SeqCst);
                match worker.jobs.send(job) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::SendError(job)) => {
                        worker.unfinished.fetch_sub(1, Ordering::SeqCst);
                        job
                    }
                }
            }
            None => job,
        };
        let (jobs, received) = mpsc::channel::<Job>();
        let unfinished = Arc::new(AtomicU64::new(1));
        let finished = unfinished.clone();
        std::thread::Builder::new()
            .name("usbpass-vm".into())
            .spawn(move || {
                // Parked here between calls; ends when the executor retires or forgets
                // the worker.
                for job in received {
                    job();
                    finished.fetch_sub(1, Ordering::SeqCst);
                }
            })?;
        jobs.send(job)
            .expect("a worker just started holds its receiver");
        self.workers.insert(vm, Worker { jobs, unfinished });
        Ok(())
    }
}

/// The slot's lock; a connect thread that panicked must not hide the others' results.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Connector, FailureKind};
    use crate::model::alias::HostdevAlias;
    use crate::reconcile::DetachReason;
    use crate::testing::devices::device;
    use crate::testing::fake_hypervisor::{Call, FakeConnector, FakeWorld, SharedWorld};

    #[test]
    fn an_action_becomes_one_call_and_its_answer() {
        let world = SharedWorld::new(FakeWorld::with_domains(&["win11"]));
        let hypervisor = FakeConnector {
            world: world.clone(),
        }
        .connect("test:///default", crate::event::event_channel().0)
        .unwrap();
        let receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        let alias = HostdevAlias::for_rules(&receiver);
        let attach = Action::Attach {
            domain: "win11".into(),
            device: Box::new(receiver),
            alias: alias.clone(),
            rule: "receiver".into(),
        };
        let outcome = execute(&hypervisor, attach.clone());
        assert_eq!(outcome.action, attach);
        assert_eq!(outcome.result, Ok(()));
        assert_eq!(world.lock().aliases_in("win11"), [alias.to_string()]);

        let detach = Action::Detach {
            domain: "fedora".into(),
            alias: alias.clone(),
            id: None,
            address: None,
            reason: DetachReason::DeviceGone,
        };
        let outcome = execute(&hypervisor, detach);
        let error = outcome.result.unwrap_err();
        assert_eq!(error.kind(), FailureKind::DomainGone);
        assert_eq!(
            world.lock().calls.last(),
            Some(&Call::Detach {
                domain: "fedora".into(),
                alias: alias.to_string(),
            })
        );
    }

    #[test]
    fn a_worker_is_retired_only_with_no_call_left_and_the_next_call_starts_another() {
        let (sender, events) = crate::event::event_channel();
        let mut executor = Executor::new(sender);
        let (open_gate, gate) = mpsc::channel::<()>();
        let refused = |_: CallId, message: String| {
            CallOutcome::Listing(Err(HypervisorError::ListDomains {
                kind: FailureKind::Other,
                message,
            }))
        };
        let blocked = executor.start(
            Some("win11".into()),
            move |_| {
                gate.recv().unwrap();
                CallOutcome::Connected
            },
            refused,
        );
        // Busy: retiring it would let a second worker of win11 call beside it.
        executor.retire_idle_workers();
        assert_eq!(executor.workers.len(), 1);
        open_gate.send(()).unwrap();
        let answered = |events: &mpsc::Receiver<Event>| match events
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
        {
            Event::CallFinished(finished) => finished.call,
            other => panic!("not a call's answer: {other:?}"),
        };
        assert_eq!(answered(&events), blocked);
        // The count drops just after the answer is sent.
        let deadline = Instant::now() + Duration::from_secs(10);
        while executor.workers["win11"].unfinished.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "the worker never finished its call"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        executor.retire_idle_workers();
        assert!(executor.workers.is_empty());
        let next = executor.start(Some("win11".into()), |_| CallOutcome::Connected, refused);
        assert_eq!(answered(&events), next);
        assert_eq!(executor.workers.len(), 1);
    }
}
