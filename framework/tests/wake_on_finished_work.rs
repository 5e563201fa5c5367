//! The processor loop, holding a message its pipeline rejected, looks again as soon as a task
//! finished rather than after its retry pause: otherwise the step's threads sit idle for the
//! rest of the pause after every task (a fifth or more of their time with tasks of 2 ms).
//!
//! The pauses here are an hour, so only the wake-up can let the loop go on.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rill::backends::local::LocalBroker;
use rill::processor::{ProcessorConfig, ProcessorHandle, StreamProcessor};
use rill::steps::{CommitOffsets, RunTaskInThreads};
use rill::{Message, Partition, Topic};

const HOUR: Duration = Duration::from_secs(3600);

fn wait_for(what: &str, handle: &ProcessorHandle, condition: impl Fn(u64, u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = handle.stats();
        if condition(stats.messages_submitted, stats.rejections) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached, at {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_rejected_message_is_submitted_as_soon_as_the_task_ahead_of_it_finished() {
    let broker = LocalBroker::new();
    let topic = Topic::new("in");
    broker.create_topic(&topic, 1);
    let partition = Partition::new(topic.clone(), 0);
    for n in 0..3_u64 {
        broker.produce_to(&partition, n).unwrap();
    }
    // Each task waits for one release.
    let (release, gate) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let factory = move |_: &[Partition]| {
        let gate = Arc::clone(&gate);
        let work = move |m: Message<u64>| {
            let _ = gate.lock().recv();
            Ok(m)
        };
        RunTaskInThreads::blocking(work, 1, CommitOffsets::new(Duration::ZERO)).unwrap()
    };
    let config = ProcessorConfig::default()
        .with_poll_timeout(HOUR)
        .with_retry_interval(HOUR);
    let mut processor =
        StreamProcessor::new(broker.subscribe("g", std::slice::from_ref(&topic)), factory)
            .with_config(config);
    let handle = processor.handle();
    let runner = std::thread::spawn(move || processor.run());

    // One task runs; the next message was rejected and the loop waits for room.
    wait_for(
        "the second message rejected",
        &handle,
        |submitted, rejections| submitted == 1 && rejections >= 1,
    );
    release.send(()).unwrap();
    wait_for(
        "the second message submitted once the first task finished",
        &handle,
        |submitted, _| submitted == 2,
    );
    release.send(()).unwrap();
    wait_for("the third message submitted", &handle, |submitted, _| {
        submitted == 3
    });
    // Asked to stop while the last task runs (the loop then checks every millisecond), the
    // processor joins it.
    handle.signal_shutdown();
    release.send(()).unwrap();

    runner.join().unwrap().unwrap();
    assert_eq!(broker.committed("g", &partition), Some(3));
}
