//! Fuzz target: arbitrary bytes as everything a client sends to the NBD server, from the
//! handshake on (client flags, options, STARTTLS refusals, then requests if a GO succeeds).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskstream_nbd::fuzzing::handshake(data);
});
