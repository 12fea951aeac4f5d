//! Entry points for fuzzing: each takes arbitrary bytes, feeds them to one
//! decoder or state machine that reads input from outside, and must never
//! panic. Used by the `cargo fuzz` targets in `fuzz/` and by the smoke test
//! that replays their corpus in the ordinary test run.
