//! One key layout: the scripts name keys through `keys_lib.lua`, Rust through `Keys`; both must
//! name every key alike, or a script and the code around it would read different keys.

use crate::common::*;
use pulse_ingestor::store::{Keys, PendingWindow};

#[test]
fn the_scripts_and_keys_name_every_key_alike() {
    let redis = RedisServer::start();
    // A prefix with glob characters, as operators may choose.
    let keys = Keys::new("bill[eu]");
    let lib = include_str!("../../src/store/scripts/keys_lib.lua");
    let names = "local b = ARGV[1]
return {key.conf(b), key.wins(b), key.futures(b), key.gen(b), key.window(b), key.window_len(b),
  key.agg(b, 'A'), key.hi(key.agg(b, 'A')), key.agg(b, 'B'), key.hi(key.agg(b, 'B')),
  key.pending(b), key.sealed(b, 3600), key.amend(b, 3600, 2), key.dead(b, 3600),
  key.dead_amend(b, 3600, 2), key.late(b, 3600), key.idxt(b, 3600), key.marks(b),
  key.seen(b, '86400:5:3'), key.member(3600, 7200), key.amend_member(3600, 7200, 2, 10800)}";
    let mut conn = redis.conn();
    let lua: Vec<String> = redis::cmd("EVAL")
        .arg(format!("{lib}\n{names}"))
        .arg(0)
        .arg(keys.base(3))
        .query(&mut conn)
        .unwrap();
    let window = PendingWindow::parse("3600:7200:x").unwrap();
    let amendment = PendingWindow::parse("3600:7200:x:a2:10800").unwrap();
    let mut rust: Vec<String> = keys.generation_keys(3).to_vec();
    rust.extend([
        keys.sealed(3, &window),
        keys.sealed(3, &amendment),
        keys.dead(3, &window),
        keys.dead(3, &amendment),
        keys.late(3, 3600),
        keys.index_tenants(3, 3600),
        keys.marks(3),
        keys.seen(3, "86400:5:3"),
        window.member,
        amendment.member,
    ]);
    assert_eq!(lua, rust);
}
