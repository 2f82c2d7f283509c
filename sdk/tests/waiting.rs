//! What arrives while a callback waits: the filter is called for it when the callback returns,
//! so no body byte and no trailer passes unseen, and bytes it let through are not shown twice.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use weft_sdk::testing::{FilterTest, Verdict};
use weft_sdk::{Action, Body, Headers, HttpFilter, Plugin, Response, time};

thread_local! {
    /// What the filter saw, in order: body views (with their end-of-stream flag) and trailers.
    static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn seen() -> Vec<String> {
    SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

/// Scans request bodies: a chunk with `slow` makes it wait a second, one with `bad` answers
/// 403, one with `hold` keeps buffering, one with `shrink` becomes `x` and one with `grow`
/// longer, and it upper-cases what
/// it lets through.
struct Scanner;

impl Plugin for Scanner {
    type Config = ();
    type Filter = ScanFilter;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Scanner)
    }
    fn filter(self: &Rc<Self>) -> ScanFilter {
        ScanFilter
    }
}

struct ScanFilter;

impl HttpFilter for ScanFilter {
    async fn on_request_body(&self, body: &mut Body, end_of_stream: bool) -> Action {
        let text = String::from_utf8(body.bytes().expect("bytes")).expect("utf-8");
        SEEN.with(|s| s.borrow_mut().push(format!("{text}|{end_of_stream}")));
        if text.contains("slow") {
            time::sleep(Duration::from_secs(1)).await;
        }
        if text.contains("bad") {
            return Action::respond(Response::new(403).body("no"));
        }
        if text.contains("hold") && !end_of_stream {
            return Action::Pause;
        }
        if text.contains("shrink") {
            body.replace(b"x").expect("replace");
            return Action::Continue;
        }
        if text.contains("grow") {
            body.replace(b"grown much longer ").expect("replace");
            return Action::Continue;
        }
        body.replace(text.to_ascii_uppercase().as_bytes())
            .expect("replace");
        Action::Continue
    }

    async fn on_request_trailers(&self, trailers: &mut Headers) -> Action {
        let v = trailers.get("x-t").unwrap_or_default();
        SEEN.with(|s| s.borrow_mut().push(format!("trailers {v}")));
        Action::Continue
    }

    const WANTS_BODIES: bool = true;
}

const POST: [(&str, &str); 3] = [(":method", "POST"), (":path", "/"), (":authority", "x")];

#[test]
fn chunks_that_arrive_while_a_body_callback_waits_are_scanned_too() {
    let t = FilterTest::new::<Scanner>("").expect("config");
    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_body(b"slow ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"bad", true), Verdict::Paused);
    assert!(s.local_response().is_none());
    t.advance(Duration::from_secs(1));
    // The second chunk is scanned on its own once the first is let through, and refused.
    assert_eq!(seen(), ["slow |false", "bad|true"]);
    assert_eq!(s.local_response().expect("refused").status, 403);
    assert!(!s.request_resumed());
    s.finish();
}

#[test]
fn a_waiting_callback_then_the_rest_then_the_request_goes_on() {
    let t = FilterTest::new::<Scanner>("").expect("config");
    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_body(b"slow ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"fine ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"end", true), Verdict::Paused);
    t.advance(Duration::from_secs(1));
    // Successive chunks that arrived meanwhile come as one view; nothing is seen twice.
    assert_eq!(seen(), ["slow |false", "fine end|true"]);
    assert!(s.request_resumed());
    assert_eq!(s.request_body_bytes(), b"SLOW FINE END");
    assert!(s.local_response().is_none());
    s.finish();
}

#[test]
fn trailers_that_arrive_while_the_body_waits_are_seen_after_it() {
    let t = FilterTest::new::<Scanner>("").expect("config");
    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_body(b"slow", false), Verdict::Paused);
    assert_eq!(s.request_trailers(&[("x-t", "1")]), Verdict::Paused);
    assert!(!s.request_resumed());
    t.advance(Duration::from_secs(1));
    assert_eq!(seen(), ["slow|false", "trailers 1"]);
    assert!(s.request_resumed());
    assert_eq!(s.request_body_bytes(), b"SLOW");
    s.finish();
}

#[test]
fn a_filter_that_keeps_buffering_sees_all_it_holds_and_not_what_it_let_through() {
    let t = FilterTest::new::<Scanner>("").expect("config");
    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    // Let through at once: gone from the next view.
    assert_eq!(s.request_body(b"a ", false), Verdict::Continue);
    // Held: the next view has it and the new chunk.
    assert_eq!(s.request_body(b"hold ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"b", true), Verdict::Continue);
    assert_eq!(seen(), ["a |false", "hold |false", "hold b|true"]);
    assert_eq!(s.request_body_bytes(), b"A HOLD B");

    // A wait, then buffering: the held bytes and what came meanwhile are seen together.
    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_body(b"slow hold ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"c", true), Verdict::Paused);
    t.advance(Duration::from_secs(1));
    // The waiting callback paused (keep buffering): its bytes are shown again with the rest.
    assert_eq!(seen(), ["slow hold |false", "slow hold c|true"]);
    // That view waits too (it says `slow`), then lets everything through.
    assert!(!s.request_resumed());
    t.advance(Duration::from_secs(1));
    assert!(s.request_resumed());
    assert_eq!(s.request_body_bytes(), b"SLOW HOLD C");
    assert!(seen().is_empty());
}

#[test]
fn a_waiting_callback_that_changes_the_length_of_its_bytes_does_not_shift_the_next_view() {
    let t = FilterTest::new::<Scanner>("").expect("config");
    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_body(b"slow shrink ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"tail", true), Verdict::Paused);
    t.advance(Duration::from_secs(1));
    assert_eq!(seen(), ["slow shrink |false", "tail|true"]);
    assert!(s.request_resumed());
    assert_eq!(s.request_body_bytes(), b"xTAIL");

    let s = t.request(&POST);
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_body(b"slow grow ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"tail", true), Verdict::Paused);
    t.advance(Duration::from_secs(1));
    assert_eq!(seen(), ["slow grow |false", "tail|true"]);
    assert_eq!(s.request_body_bytes(), b"grown much longer TAIL");
}
