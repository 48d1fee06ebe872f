//! How long the rules take to decide one order against 1,000 rules.
//!
//! `cargo bench --bench rules -- --warm-up-time 1 --measurement-time 3`
//!
//! Every rule has an end-customer domain (one exact, one `*` pattern), a
//! partner, countries and hold reasons, so each rule is really tested; the
//! order matches only the last rule (by exact domain, or by pattern), or no
//! rule at all.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use holdclear::domain::{HeldOrder, HeldOrderEvent};
use holdclear::rules::Rules;

const RULES: usize = 1_000;

fn rules() -> Rules {
    let mut text = String::new();
    for i in 0..RULES {
        text += &format!(
            "[[rule]]\nname = \"customer-{i}\"\n[rule.when]\n\
             end_customer_domain = [\"customer{i}.com\", \"*.customer{i}.com\"]\n\
             partner_id = [\"P-{i}\", \"P-100\"]\n\
             country = [\"US\", \"CA\"]\n\
             hold_reason = [\"NO_SMART_ACCOUNT\", \"PENDING_SMART_ACCOUNT\"]\n\
             [rule.assign]\nsmart_account = {{ domain = \"customer{i}.com\" }}\naccount_type = \"CUSTOMER\"\n\
             [rule.fallback]\nsmart_account = {{ domain = \"globex-holding.com\" }}\naccount_type = \"HOLDING\"\n\
             virtual_account = \"Holding\"\n"
        );
    }
    match Rules::parse(&text, Path::new("bench-rules.toml")) {
        Ok(r) => r,
        Err(e) => panic!("the generated rules are invalid: {e}"),
    }
}

fn order(email: &str) -> HeldOrder {
    let body = format!(
        r#"{{"specversion":"1.0","type":"commerce.order.held.v1","source":"/commerce/orders","id":"bench-1",
            "data":{{"salesOrderNumber":"104233871","holdReason":"NO_SMART_ACCOUNT","orderType":"STANDARD",
            "partner":{{"id":"P-100","name":"Globex Networks"}},
            "endCustomer":{{"name":"Bench","email":"{email}","country":"US"}},
            "lines":[{{"lineNumber":"1.1","sku":"C9300-48P-E","productFamily":"C9300"}}]}}}}"#
    );
    match HeldOrderEvent::decode(body.as_bytes(), 256 * 1024) {
        Ok(e) => e.data,
        Err(e) => panic!("the bench event is invalid: {e}"),
    }
}

fn bench(c: &mut Criterion) {
    let rules = rules();
    let last = format!("customer-{}", RULES - 1);
    let cases = [
        (
            "decide/1000 rules/last matches by domain",
            order(&format!("it@customer{}.com", RULES - 1)),
            Some(&last),
        ),
        (
            "decide/1000 rules/last matches by pattern",
            order(&format!("it@eu.customer{}.com", RULES - 1)),
            Some(&last),
        ),
        (
            "decide/1000 rules/none matches",
            order("it@nobody.example"),
            None,
        ),
    ];
    for (name, order, expected) in &cases {
        let got = rules.decide(order).map(|d| d.rule);
        assert_eq!(got.as_ref(), *expected, "{name}");
        c.bench_function(name, |b| b.iter(|| rules.decide(black_box(order))));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
