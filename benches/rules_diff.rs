//! How long `holdclear rules diff` takes, apart from reading the rows:
//! 100,000 stored events (the JSON `cases.event` holds) decoded and replayed
//! through two rule sets of 200 rules, with the report of what changes.
//!
//! `cargo bench --bench rules_diff -- --warm-up-time 1 --measurement-time 10`
//!
//! The new rules move a tenth of the customers to another virtual account
//! (target changes), drop another tenth (newly unmatched) and send the
//! orders of partner P-7 to a rule of their own (rule changes).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use holdclear::domain::HeldOrderEvent;
use holdclear::rules::{Rules, WhatIf};

const EVENTS: usize = 100_000;
const CUSTOMERS: usize = 200;

fn rules(new: bool) -> Rules {
    let mut text = String::new();
    if new {
        text += "[[rule]]\nname = \"partner-7\"\n[rule.when]\npartner_id = [\"P-7\"]\n\
                 [rule.assign]\nsmart_account = { domain = \"partner7-holding.com\" }\naccount_type = \"HOLDING\"\n";
    }
    for i in 0..CUSTOMERS {
        if new && i % 10 == 1 {
            continue;
        }
        let va = if new && i % 10 == 0 {
            "Network"
        } else {
            "DEFAULT"
        };
        text += &format!(
            "[[rule]]\nname = \"customer-{i}\"\n[rule.when]\n\
             end_customer_domain = [\"customer{i}.com\", \"*.customer{i}.com\"]\n\
             country = [\"US\", \"CA\", \"DE\"]\n\
             [rule.assign]\nsmart_account = {{ domain = \"customer{i}.com\" }}\naccount_type = \"CUSTOMER\"\n\
             virtual_account = \"{va}\"\n\
             [rule.fallback]\nsmart_account = {{ domain = \"globex-holding.com\" }}\naccount_type = \"HOLDING\"\n\
             virtual_account = \"Holding\"\n"
        );
    }
    match Rules::parse(
        &text,
        Path::new(if new { "new.toml" } else { "rules.toml" }),
    ) {
        Ok(r) => r,
        Err(e) => panic!("the generated rules are invalid: {e}"),
    }
}

/// The events as `cases.event` stores them (the decoder's own serialisation).
fn stored_events() -> Vec<(String, String)> {
    (0..EVENTS)
        .map(|n| {
            let customer = n % (CUSTOMERS + CUSTOMERS / 20); // some match no rule
            let body = format!(
                r#"{{"specversion":"1.0","type":"commerce.order.held.v1","source":"/commerce/orders","id":"bench-{n}",
                "data":{{"salesOrderNumber":"{so}","holdReason":"NO_SMART_ACCOUNT","orderType":"STANDARD",
                "partner":{{"id":"P-{p}","name":"Partner"}},
                "endCustomer":{{"name":"Bench","email":"it@shop.customer{customer}.com","country":"US"}},
                "lines":[{{"lineNumber":"1.1","sku":"C9300-48P-E","productFamily":"C9300"}}]}}}}"#,
                so = 100_000_000 + n,
                p = n % 50,
            );
            let event = match HeldOrderEvent::decode(body.as_bytes(), 256 * 1024) {
                Ok(e) => e,
                Err(e) => panic!("the bench event is invalid: {e}"),
            };
            let stored = serde_json::to_string(&event).expect("serialisable");
            ((100_000_000 + n).to_string(), stored)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (old, new) = (rules(false), rules(true));
    let events = stored_events();
    let mut group = c.benchmark_group("rules_diff");
    group.sample_size(10);
    group.bench_function("100000 stored events, 200 rules each side", |b| {
        b.iter(|| {
            let mut what_if = WhatIf::new(&old, &new);
            for (key, text) in &events {
                match serde_json::from_str::<HeldOrderEvent>(text) {
                    Ok(e) => what_if.replay(key, &e.data),
                    Err(e) => what_if.unreadable(key, "-", &e.to_string()),
                }
            }
            let report = what_if.finish();
            assert!(!report.changes.is_empty() && report.unreadable.is_empty());
            black_box(report)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
