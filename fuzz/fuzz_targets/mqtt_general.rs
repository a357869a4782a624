#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar::fuzzing::mqtt_general(data));
