//! Fuzz target: arbitrary bytes as a `--blockdev` dotted key=value option string.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskstream_qmp::fuzzing::keyval(data);
});
