//! Fuzz target: arbitrary bytes as a QMP client's input (JSON dialect parser, then schema
//! validation of any `arguments`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskstream_qmp::fuzzing::qmp_input(data);
});
