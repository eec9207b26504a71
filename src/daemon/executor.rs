//! Carries out libvirt calls off the loop's thread and hands back what happened as
//! plain data, as `Event::CallFinished` on the loop's one channel. The loop decides and
//! books the outcome; the executor only calls, and reads and changes none of the loop's
//! state.
//!
//! Each VM's attaches and detaches run on that VM's worker thread, in the order they
//! were issued; the worker is started on the VM's first call, parks between calls and
//! ends when the VM stops, so two workers of one running VM never call at once. A VM
//! whose QEMU does not answer holds up only its own worker. Connects, listings and the
//! definitions chore run on the general worker, which is started by the first and
//! stays; one issued while it is busy, perhaps with a call that will never return,
//! runs on a thread of its own, which exits when the call returns.
//!
//! Workers park instead of exiting because an ended thread costs an idle daemon more
//! than a parked one: glibc keeps its stack in a cache for reuse, and the exit maps
//! glibc's per-thread clean-up code, which nothing else runs (BENCHMARKS.md, idle
//! memory). A parked worker gives back the deep part of its stack, which libvirt's RPC
//! code deepens, after each job (`util::stack`). A call cannot be cancelled; the loop
//! gives up waiting at its deadline and books the real answer whenever it comes.

use crate::event::{Event, EventSender};
use crate::hypervisor::{
    Connector, FailureKind, HostdevSpec, Hypervisor, HypervisorError, RunningDomains,
};
use crate::reconcile::Action;
use std::collections::{HashMap, VecDeque};
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

/// One call, ready to run on whichever thread takes it: it makes the call and returns
/// how to answer it. A worker sends the answer only after it has counted the job
/// finished, so that the loop, which the answer wakes, finds the worker free.
type Job = Box<dyn FnOnce() -> Answer + Send>;
type Answer = Box<dyn FnOnce() + Send>;

/// Starts calls off the loop's thread; their outcomes come back on `events`.
pub struct Executor {
    events: EventSender,
    next_call: u64,
    counts: Arc<CallCounts>,
    /// Each VM's worker, by VM name.
    workers: HashMap<String, Worker>,
    /// Connects, listings and chores; started by the first, never ended.
    general: Option<Worker>,
    /// The answers of calls no thread could be started for, for the loop to take
    /// (`take_refused`) before it waits for its channel.
    refused: VecDeque<CallFinished>,
    /// Every call is refused as if no thread could be started.
    #[cfg(test)]
    refuse_threads: bool,
}

/// A worker thread (a VM's, or the general one): where its jobs go, and how many it
/// has not finished.
struct Worker {
    jobs: Sender<Job>,
    unfinished: Arc<AtomicU64>,
}

impl Worker {
    /// Queues `job` on `existing` if its thread is still there; otherwise starts a
    /// worker named `name` with it and returns that worker, for the caller to keep.
    fn give_or_start(
        existing: Option<&Worker>,
        name: &str,
        job: Job,
    ) -> std::io::Result<Option<Worker>> {
        let job = match existing {
            Some(worker) => match worker.give(job) {
                Ok(()) => return Ok(None),
                Err(job) => job,
            },
            None => job,
        };
        Worker::start(name, job).map(Some)
    }

    /// A thread named `name` that runs `first`, then each job it is given, in order,
    /// until its `Worker` is dropped; it gives the deep part of its stack back after
    /// each job, once the job is answered.
    fn start(name: &str, first: Job) -> std::io::Result<Worker> {
        let (jobs, received) = mpsc::channel::<Job>();
        let unfinished = Arc::new(AtomicU64::new(1));
        let finished = unfinished.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Parked here between jobs; ends when the executor forgets the worker.
                for job in received {
                    let answer = job();
                    finished.fetch_sub(1, Ordering::SeqCst);
                    answer();
                    // After the answer, off its way to the loop; a job queued meanwhile
                    // waits only for this.
                    if let Err(error) = crate::util::stack::release_unused_stack() {
                        log::debug!("cannot release the unused stack of a worker: {error}");
                    }
                }
            })?;
        jobs.send(first)
            .expect("a worker just started holds its receiver");
        Ok(Worker { jobs, unfinished })
    }

    /// Queues `job`, or hands it back if the thread is gone.
    fn give(&self, job: Job) -> Result<(), Job> {
        self.unfinished.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|mpsc::SendError(job)| {
            self.unfinished.fetch_sub(1, Ordering::SeqCst);
            job
        })
    }
}

impl Executor {
    pub fn new(events: EventSender) -> Executor {
        Executor {
            events,
            next_call: 0,
            counts: Arc::default(),
            workers: HashMap::new(),
            general: None,
            refused: VecDeque::new(),
            #[cfg(test)]
            refuse_threads: false,
        }
    }

    /// The VM stopped: its worker exits once its calls are done.
    pub fn forget_vm(&mut self, domain: &str) {
        self.workers.remove(domain);
    }

    /// The answer of a call no thread could be started for, oldest first.
    pub fn take_refused(&mut self) -> Option<CallFinished> {
        self.refused.pop_front()
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

    /// Runs `call` on `worker`'s thread (the general worker's for `None`), or on a new
    /// one, and sends its outcome. A call no thread can be started for is answered at
    /// once with `refused`'s outcome, kept for `take_refused`, so the loop books it like
    /// any failed call.
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
            Box::new(move || {
                // The loop gone means the daemon is stopping: nobody is left to tell.
                let _ = events.send(Event::CallFinished(Box::new(CallFinished {
                    call: id,
                    outcome,
                })));
                counts.answered.fetch_add(1, Ordering::SeqCst);
            })
        });
        let started = match worker {
            #[cfg(test)]
            _ if self.refuse_threads => Err(std::io::Error::other("refused by the test")),
            Some(vm) => self.hand_to_worker(vm, job),
            None => self.hand_to_general_worker(job),
        };
        if let Err(error) = started {
            let outcome = refused(id, format!("cannot start a thread for the call: {error}"));
            // Kept for the loop to take, not sent: this runs on the loop's thread, and a
            // send to its own bounded channel, full in a storm, would never return.
            self.refused.push_back(CallFinished { call: id, outcome });
            self.counts.answered.fetch_add(1, Ordering::SeqCst);
        }
        id
    }

    /// Queues `job` on the VM's worker, starting one if it has none (or its thread is
    /// gone).
    fn hand_to_worker(&mut self, vm: String, job: Job) -> std::io::Result<()> {
        if let Some(started) = Worker::give_or_start(self.workers.get(&vm), "usbpass-vm", job)? {
            self.workers.insert(vm, started);
        }
        Ok(())
    }

    /// Queues a connect or listing on the general worker when it has nothing to do,
    /// starting it if there is none yet; when it is busy, the call gets a thread of
    /// its own, so that it never waits behind a call that may not return.
    fn hand_to_general_worker(&mut self, job: Job) -> std::io::Result<()> {
        let busy = self
            .general
            .as_ref()
            .is_some_and(|general| general.unfinished.load(Ordering::SeqCst) > 0);
        if busy {
            return std::thread::Builder::new()
                .name("usbpass-call".into())
                .spawn(move || job()())
                .map(drop);
        }
        self.give_to_general_worker(job)
    }

    /// Queues `job` on the general worker, starting it if there is none (or its thread
    /// is gone).
    fn give_to_general_worker(&mut self, job: Job) -> std::io::Result<()> {
        if let Some(started) = Worker::give_or_start(self.general.as_ref(), "usbpass-libvirt", job)?
        {
            self.general = Some(started);
        }
        Ok(())
    }

    /// Queues `chore` on the general worker, behind whatever it has: a chore has no
    /// deadline and may wait for a slow call. It is not a call: no `CallFinished`.
    pub fn queue_chore(&mut self, chore: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let chore: Job = Box::new(move || {
            chore();
            Box::new(|| ())
        });
        self.give_to_general_worker(chore)
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

    /// A call that records the thread it ran on.
    fn recording_thread(
        threads: &Arc<Mutex<Vec<std::thread::ThreadId>>>,
    ) -> impl FnOnce(CallId) -> CallOutcome + Send + 'static {
        let threads = threads.clone();
        move |_| {
            lock(&threads).push(std::thread::current().id());
            CallOutcome::Connected
        }
    }

    #[test]
    fn a_vms_worker_serves_its_calls_in_order_until_the_vm_is_forgotten() {
        let (sender, events) = crate::event::event_channel();
        let mut executor = Executor::new(sender);
        let (open_gate, gate) = mpsc::channel::<()>();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let blocked = executor.start(
            Some("win11".into()),
            move |_| {
                gate.recv().unwrap();
                CallOutcome::Connected
            },
            listing_refused,
        );
        // Queued behind the blocked call on the same worker, never beside it.
        let queued = executor.start(
            Some("win11".into()),
            recording_thread(&threads),
            listing_refused,
        );
        assert!(events.recv_timeout(Duration::from_millis(50)).is_err());
        open_gate.send(()).unwrap();
        assert_eq!(next_answer(&events), blocked);
        assert_eq!(next_answer(&events), queued);
        // The worker counts a call finished before it answers, and stays.
        assert_eq!(
            executor.workers["win11"].unfinished.load(Ordering::SeqCst),
            0
        );
        answered_call(&mut executor, &events, recording_thread(&threads));
        {
            let threads = lock(&threads);
            assert_eq!(
                threads[0], threads[1],
                "the worker was replaced between calls"
            );
        }
        executor.forget_vm("win11");
        assert!(executor.workers.is_empty());
        answered_call(&mut executor, &events, recording_thread(&threads));
        let threads = lock(&threads);
        assert_ne!(
            threads[1], threads[2],
            "a forgotten vm's worker served a new call"
        );
    }

    /// Starts `call` on win11's worker and waits for its answer.
    fn answered_call(
        executor: &mut Executor,
        events: &mpsc::Receiver<Event>,
        call: impl FnOnce(CallId) -> CallOutcome + Send + 'static,
    ) {
        let started = executor.start(Some("win11".into()), call, listing_refused);
        assert_eq!(next_answer(events), started);
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    fn listing_refused(_: CallId, message: String) -> CallOutcome {
        CallOutcome::Listing(Err(HypervisorError::ListDomains {
            kind: FailureKind::Other,
            message,
        }))
    }

    fn next_answer(events: &mpsc::Receiver<Event>) -> CallId {
        match events.recv_timeout(Duration::from_secs(10)).unwrap() {
            Event::CallFinished(finished) => finished.call,
            other => panic!("not a call's answer: {other:?}"),
        }
    }

    /// A call that records the name of the thread it ran on.
    fn recording(
        threads: &Arc<Mutex<Vec<String>>>,
    ) -> impl FnOnce(CallId) -> CallOutcome + Send + 'static {
        let threads = threads.clone();
        move |_| {
            let name = thread_name();
            lock(&threads).push(name);
            CallOutcome::Connected
        }
    }

    #[test]
    fn calls_of_no_vm_and_chores_share_one_general_worker_that_stays() {
        let (sender, events) = crate::event::event_channel();
        let mut executor = Executor::new(sender);
        let threads = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..3 {
            let call = executor.start(None, recording(&threads), listing_refused);
            // Answered only once the worker is free: the next call finds it so.
            assert_eq!(next_answer(&events), call);
        }
        let (chore_done, chore_finished) = mpsc::channel();
        let chore_threads = threads.clone();
        executor
            .queue_chore(move || {
                let name = thread_name();
                lock(&chore_threads).push(name);
                chore_done.send(()).unwrap();
            })
            .unwrap();
        chore_finished
            .recv_timeout(Duration::from_secs(10))
            .unwrap();
        // A chore sends no answer: the worker is free once its count says so.
        let general = executor.general.as_ref().unwrap().unfinished.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        while general.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the chore never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        let call = executor.start(None, recording(&threads), listing_refused);
        assert_eq!(next_answer(&events), call);
        assert_eq!(*lock(&threads), vec!["usbpass-libvirt"; 5]);
    }

    #[test]
    fn a_call_of_no_vm_never_waits_behind_one_that_has_not_returned() {
        let (sender, events) = crate::event::event_channel();
        let mut executor = Executor::new(sender);
        let (open_gate, gate) = mpsc::channel::<()>();
        let hung = executor.start(
            None,
            move |_| {
                gate.recv().unwrap();
                CallOutcome::Connected
            },
            listing_refused,
        );
        let threads = Arc::new(Mutex::new(Vec::new()));
        let next = executor.start(None, recording(&threads), listing_refused);
        assert_eq!(next_answer(&events), next);
        assert_eq!(*lock(&threads), ["usbpass-call"]);
        // A chore may wait: it runs on the general worker once the hung call is back.
        let (chore_done, chore_finished) = mpsc::channel();
        executor
            .queue_chore(move || {
                let name = thread_name();
                chore_done.send(name).unwrap();
            })
            .unwrap();
        assert!(chore_finished
            .recv_timeout(Duration::from_millis(50))
            .is_err());
        open_gate.send(()).unwrap();
        assert_eq!(next_answer(&events), hung);
        assert_eq!(
            chore_finished
                .recv_timeout(Duration::from_secs(10))
                .unwrap(),
            "usbpass-libvirt"
        );
    }

    #[test]
    fn a_call_no_thread_can_be_started_for_is_answered_without_the_channel() {
        // A channel with no room: a send from the loop's own thread would block.
        let (sender, events) = mpsc::sync_channel(0);
        let mut executor = Executor::new(sender);
        executor.refuse_threads = true;
        let first = executor.start(None, |_| CallOutcome::Connected, listing_refused);
        let second = executor.start(
            Some("win11".into()),
            |_| CallOutcome::Connected,
            listing_refused,
        );
        assert!(events.try_recv().is_err(), "a refused call was sent");
        for expected in [first, second] {
            let refused = executor.take_refused().unwrap();
            assert_eq!(refused.call, expected);
            assert!(matches!(
                refused.outcome,
                CallOutcome::Listing(Err(HypervisorError::ListDomains { ref message, .. }))
                    if message.contains("cannot start a thread for the call")
            ));
        }
        assert!(executor.take_refused().is_none());
        assert_eq!(executor.counts().get(), (2, 2));
    }
}
