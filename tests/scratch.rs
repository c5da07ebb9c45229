mod common;
use common::*;
use std::fs;

fn cycle(seed: u64) {
    for i in 0..15 {
        let mut d = Daemon::start();
        let m = d.volume_mounted("v", &[]);
        fs::write(m.join("f"), pseudo_random(1 << 20, seed + i)).unwrap();
        let s = d.stop();
        if !s.success() {
            eprintln!("iter {i}: stop: {s}");
            eprintln!("{}", d.log());
            panic!("bad exit {s}");
        }
    }
}
#[test]
fn c1() {
    cycle(1)
}
#[test]
fn c2() {
    cycle(100)
}
#[test]
fn c3() {
    cycle(200)
}
#[test]
fn c4() {
    cycle(300)
}
