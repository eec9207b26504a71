//! A work queue whose thread exists only while it has work: the thread is started by
//! the first item, takes items in order, and ends when the queue is empty. An idle
//! daemon keeps no stack for work that comes once per plug.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the work function says after an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continue {
    /// Take the next item.
    Yes,
    /// Nobody wants the results any more: drop the queue and never start again.
    Never,
}

struct Queue<T> {
    items: VecDeque<T>,
    /// A thread is taking items; it is the only one that clears this, and only under
    /// the lock with the queue empty, so an item pushed under the lock is never left.
    running: bool,
    /// The work said `Continue::Never`.
    closed: bool,
}

/// Items of type `T` handed to `work`, one at a time, in the order they were pushed,
/// on a thread named `name` that lives while there are items.
pub struct OnDemandQueue<T: Send + 'static> {
    name: &'static str,
    queue: Arc<Mutex<Queue<T>>>,
    work: Arc<dyn Fn(T) -> Continue + Send + Sync>,
}

impl<T: Send + 'static> OnDemandQueue<T> {
    pub fn new(
        name: &'static str,
        work: impl Fn(T) -> Continue + Send + Sync + 'static,
    ) -> OnDemandQueue<T> {
        OnDemandQueue {
            name,
            queue: Arc::new(Mutex::new(Queue {
                items: VecDeque::new(),
                running: false,
                closed: false,
            })),
            work: Arc::new(work),
        }
    }

    /// Queues `item`, starting the thread if none runs. When no thread can be started,
    /// the work is done here and now: slower for the caller, never lost.
    pub fn push(&self, item: T) {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return;
        }
        queue.items.push_back(item);
        if queue.running {
            return;
        }
        queue.running = true;
        drop(queue);
        let (shared, work) = (self.queue.clone(), self.work.clone());
        let spawned = std::thread::Builder::new()
            .name(self.name.to_string())
            .spawn(move || take_until_empty(&shared, &*work));
        if let Err(error) = spawned {
            log::warn!(
                "cannot start the {} thread: {error}; working inline",
                self.name
            );
            take_until_empty(&self.queue, &*self.work);
        }
    }

    /// Whether a thread is taking items now (for tests).
    pub fn is_running(&self) -> bool {
        lock(&self.queue).running
    }
}

fn take_until_empty<T>(queue: &Mutex<Queue<T>>, work: &(dyn Fn(T) -> Continue + Send + Sync)) {
    loop {
        let item = {
            let mut queue = lock(queue);
            match queue.items.pop_front() {
                Some(item) => item,
                None => {
                    queue.running = false;
                    return;
                }
            }
        };
        if work(item) == Continue::Never {
            let mut queue = lock(queue);
            queue.closed = true;
            queue.items.clear();
            queue.running = false;
            return;
        }
    }
}

/// A panic in `work` aborts the process (`panic = "abort"`), so a poisoned lock only
/// happens in tests; the queue's state is whole either way.
fn lock<T>(queue: &Mutex<Queue<T>>) -> MutexGuard<'_, Queue<T>> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn wait_until(condition: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn items_are_worked_in_order_and_the_thread_ends_when_the_queue_is_empty() {
        let (done, results) = mpsc::channel();
        let (gate, opened) = mpsc::channel::<()>();
        let opened = Mutex::new(opened);
        let queue = OnDemandQueue::new("test-on-demand", move |item: u32| {
            if item == 0 {
                // Hold the thread until every other item is queued behind this one.
                lock_receiver(&opened).recv().unwrap();
            }
            done.send(item).unwrap();
            Continue::Yes
        });
        assert!(!queue.is_running());
        for item in 0..5 {
            queue.push(item);
        }
        assert!(queue.is_running());
        gate.send(()).unwrap();
        let worked: Vec<u32> = (0..5)
            .map(|_| results.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(worked, vec![0, 1, 2, 3, 4]);
        assert!(
            wait_until(|| !queue.is_running()),
            "the thread ends when idle"
        );
        // And a later item starts a thread again.
        queue.push(7);
        assert_eq!(results.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
        assert!(wait_until(|| !queue.is_running()));
    }

    #[test]
    fn never_drops_what_is_queued_and_ignores_later_items() {
        let (done, results) = mpsc::channel();
        let queue = OnDemandQueue::new("test-on-demand", move |item: u32| {
            done.send(item).unwrap();
            if item == 1 {
                Continue::Never
            } else {
                Continue::Yes
            }
        });
        queue.push(1);
        assert_eq!(results.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert!(wait_until(|| !queue.is_running()));
        queue.push(2);
        assert!(!queue.is_running(), "a closed queue starts no thread");
        assert!(results.recv_timeout(Duration::from_millis(100)).is_err());
    }

    fn lock_receiver(receiver: &Mutex<mpsc::Receiver<()>>) -> MutexGuard<'_, mpsc::Receiver<()>> {
        receiver.lock().unwrap()
    }
}
