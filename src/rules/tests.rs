//! Data-driven tests of the rules: one `check` helper per table, many cases.

use std::path::Path;

use super::*;
use crate::domain::{
    CountryCode, Email, EndCustomer, HoldReason, Line, OrderId, OrderType, Partner,
    SalesOrderNumber,
};

const FILE: &str = "rules.toml";

fn parse(text: &str) -> Result<Rules, RulesError> {
    Rules::parse(text, Path::new(FILE))
}

/// The contract's sample order, changed by `spec`: space-separated
/// `key=value` with keys `domain`, `email`, `partner`, `country`, `reason`
/// (`NO`/`PENDING`), `type`, `fam` (comma-separated); `-` removes the value.
fn order(spec: &str) -> HeldOrder {
    let mut o = HeldOrder {
        order: OrderId::new(SalesOrderNumber::parse("104233871").ok(), None)
            .expect("an order number"),
        purchase_order_number: None,
        hold_reason: HoldReason::NoSmartAccount,
        held_at: None,
        order_type: OrderType::parse("STANDARD").ok(),
        partner: Some(Partner {
            id: Some("P-100".into()),
            name: Some("Globex Networks".into()),
        }),
        end_customer: Some(EndCustomer {
            name: Some("Acme Corp".into()),
            email: Email::parse("it-admin@acme.com").ok(),
            country: CountryCode::parse("US").ok(),
        }),
        smart_account: None,
        lines: vec![line("C9300")],
    };
    for pair in spec.split_whitespace() {
        let (k, v) = pair.split_once('=').expect("key=value");
        let v = (v != "-").then_some(v);
        let customer = o.end_customer.get_or_insert_with(EndCustomer::default);
        match k {
            "domain" => {
                customer.email = v.map(|d| Email::parse(&format!("it@{d}")).expect("a domain"))
            }
            "email" => customer.email = v.map(|e| Email::parse(e).expect("an e-mail")),
            "country" => customer.country = v.map(|c| CountryCode::parse(c).expect("a country")),
            "partner" => o.partner.get_or_insert_with(Partner::default).id = v.map(str::to_owned),
            "reason" => {
                o.hold_reason = match v {
                    Some("PENDING") => HoldReason::PendingSmartAccount,
                    _ => HoldReason::NoSmartAccount,
                }
            }
            "type" => o.order_type = v.map(|t| OrderType::parse(t).expect("an order type")),
            "fam" => {
                o.lines = v
                    .map(|f| f.split(',').map(line).collect())
                    .unwrap_or_default()
            }
            other => panic!("unknown key {other} in the test spec"),
        }
    }
    o
}

fn line(family: &str) -> Line {
    Line {
        line_number: Some("1.1".into()),
        sku: Some(format!("{family}-X")),
        product_family: Some(family.into()),
    }
}

/// The failed keys of a rule, or `match`.
fn verdict(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Matched => "match".into(),
        Outcome::NotTried => "not tried".into(),
        Outcome::Failed { failures } => {
            let keys: Vec<&str> = failures.iter().map(|f| f.key.as_str()).collect();
            format!("fail {}", keys.join(","))
        }
    }
}

#[test]
fn conditions_alone_and_together() {
    // (when body, order changes, expected verdict of the only rule)
    let cases: &[(&str, &str, &str)] = &[
        ("", "", "match"),
        ("", "domain=- partner=- country=- type=- fam=-", "match"),
        // end_customer_domain, exact and globs, any case
        (r#"end_customer_domain = ["acme.com"]"#, "", "match"),
        (r#"end_customer_domain = ["ACME.Com"]"#, "", "match"),
        (
            r#"end_customer_domain = ["acme.com"]"#,
            "domain=eu.acme.com",
            "fail when.end_customer_domain",
        ),
        (
            r#"end_customer_domain = ["acme.com"]"#,
            "domain=-",
            "fail when.end_customer_domain",
        ),
        (
            r#"end_customer_domain = ["*.acme.com"]"#,
            "domain=acme.com",
            "fail when.end_customer_domain",
        ),
        (
            r#"end_customer_domain = ["*.acme.com"]"#,
            "domain=eu.acme.com",
            "match",
        ),
        (
            r#"end_customer_domain = ["*.acme.com"]"#,
            "domain=a.b.acme.com",
            "match",
        ),
        (
            r#"end_customer_domain = ["*.acme.com"]"#,
            "domain=EU.Acme.COM",
            "match",
        ),
        (
            r#"end_customer_domain = ["*.ACME.com"]"#,
            "domain=eu.acme.com",
            "match",
        ),
        (
            r#"end_customer_domain = ["*.acme.com"]"#,
            "domain=notacme.com",
            "fail when.end_customer_domain",
        ),
        (
            r#"end_customer_domain = ["*.acme.com"]"#,
            "domain=-",
            "fail when.end_customer_domain",
        ),
        (
            r#"end_customer_domain = ["acme.*"]"#,
            "domain=acme.de",
            "match",
        ),
        (
            r#"end_customer_domain = ["*"]"#,
            "domain=anything.org",
            "match",
        ),
        (
            r#"end_customer_domain = ["acme.com", "*.acme.com"]"#,
            "domain=acme.com",
            "match",
        ),
        (
            r#"end_customer_domain = ["acme.com", "*.acme.com"]"#,
            "domain=x.acme.com",
            "match",
        ),
        (
            r#"end_customer_domain = ["initech.com", "*.acme.com"]"#,
            "domain=acme.com",
            "fail when.end_customer_domain",
        ),
        // partner_id, ignoring case
        (r#"partner_id = ["P-100"]"#, "", "match"),
        (r#"partner_id = ["p-100"]"#, "", "match"),
        (
            r#"partner_id = ["P-100"]"#,
            "partner=P-200",
            "fail when.partner_id",
        ),
        (
            r#"partner_id = ["P-100"]"#,
            "partner=-",
            "fail when.partner_id",
        ),
        (r#"partner_id = ["P-200", "P-100"]"#, "", "match"),
        // country, any case in the file
        (r#"country = ["US"]"#, "", "match"),
        (r#"country = ["us", "ca"]"#, "country=CA", "match"),
        (r#"country = ["US"]"#, "country=DE", "fail when.country"),
        (r#"country = ["US"]"#, "country=-", "fail when.country"),
        // hold_reason
        (r#"hold_reason = ["NO_SMART_ACCOUNT"]"#, "", "match"),
        (
            r#"hold_reason = ["pending_smart_account"]"#,
            "",
            "fail when.hold_reason",
        ),
        (
            r#"hold_reason = ["PENDING_SMART_ACCOUNT"]"#,
            "reason=PENDING",
            "match",
        ),
        (
            r#"hold_reason = ["NO_SMART_ACCOUNT", "PENDING_SMART_ACCOUNT"]"#,
            "reason=PENDING",
            "match",
        ),
        // order_type
        (r#"order_type = ["standard"]"#, "", "match"),
        (
            r#"order_type = ["STANDARD"]"#,
            "type=EA",
            "fail when.order_type",
        ),
        (
            r#"order_type = ["STANDARD"]"#,
            "type=-",
            "fail when.order_type",
        ),
        (
            r#"order_type = ["EA", "STOCKING"]"#,
            "type=stocking",
            "match",
        ),
        // product_family: any line
        (r#"product_family = ["C9300"]"#, "", "match"),
        (r#"product_family = ["c9300"]"#, "", "match"),
        (r#"product_family = ["C9200"]"#, "fam=C9300,C9200", "match"),
        (
            r#"product_family = ["C9200"]"#,
            "fam=C9300",
            "fail when.product_family",
        ),
        (
            r#"product_family = ["C9200"]"#,
            "fam=-",
            "fail when.product_family",
        ),
        // together: every condition must hold; explain names each failure
        (
            "end_customer_domain = [\"acme.com\"]\npartner_id = [\"P-100\"]\ncountry = [\"US\"]\n\
             hold_reason = [\"NO_SMART_ACCOUNT\"]\norder_type = [\"STANDARD\"]\nproduct_family = [\"C9300\"]",
            "",
            "match",
        ),
        (
            "end_customer_domain = [\"acme.com\"]\npartner_id = [\"P-100\"]\ncountry = [\"US\"]",
            "country=CA",
            "fail when.country",
        ),
        (
            "end_customer_domain = [\"acme.com\"]\npartner_id = [\"P-100\"]\ncountry = [\"US\"]",
            "domain=initech.com partner=-",
            "fail when.end_customer_domain,when.partner_id",
        ),
        (
            "hold_reason = [\"PENDING_SMART_ACCOUNT\"]\nproduct_family = [\"C9500\"]",
            "",
            "fail when.hold_reason,when.product_family",
        ),
    ];
    for (when, spec, expected) in cases {
        let text = format!(
            "[[rule]]\nname = \"r\"\n[rule.when]\n{when}\n[rule.assign]\n\
             smart_account = {{ domain = \"acme.com\" }}\naccount_type = \"CUSTOMER\"\n"
        );
        let rules = parse(&text).unwrap_or_else(|e| panic!("{when:?}: {e}"));
        let o = order(spec);
        let explanation = rules.explain(&o);
        let got = verdict(&explanation.rules[0].outcome);
        assert_eq!(&got, expected, "when {when:?}, order {spec:?}");
        let decided = rules.decide(&o);
        assert_eq!(
            decided.is_some(),
            *expected == "match",
            "decide, when {when:?}, order {spec:?}"
        );
        assert_eq!(
            decided, explanation.decision,
            "explain agrees with decide: {when:?}, {spec:?}"
        );
    }
}

/// A rule as compact TOML: `name`, the `when` body, the `assign` body, the
/// optional `fallback` body.
fn rule(name: &str, when: &str, assign: &str, fallback: Option<&str>) -> String {
    let mut s = format!("[[rule]]\nname = \"{name}\"\n");
    if !when.is_empty() {
        s += &format!("[rule.when]\n{when}\n");
    }
    s += &format!("[rule.assign]\n{assign}\n");
    if let Some(f) = fallback {
        s += &format!("[rule.fallback]\n{f}\n");
    }
    s
}

const ACME: &str = "smart_account = { domain = \"acme.com\" }\naccount_type = \"CUSTOMER\"";
const FROM: &str =
    "smart_account = { from = \"end_customer_domain\" }\naccount_type = \"CUSTOMER\"";
const HOLDING: &str = "smart_account = { domain = \"globex-holding.com\" }\naccount_type = \"HOLDING\"\nvirtual_account = \"Holding\"";

#[test]
fn first_match_decides_the_target_and_fallback() {
    // (rules, order changes, expected: "rule | target | fallback" or "none")
    let acme_rule = rule("acme", "end_customer_domain = [\"acme.com\"]", ACME, None);
    let partner_rule = rule("partner", "partner_id = [\"P-100\"]", FROM, Some(HOLDING));
    let catch_all = rule("catch-all", "", FROM, None);
    let cases: Vec<(String, &str, &str)> = vec![
        // order of rules: first match wins
        (
            format!("{acme_rule}{partner_rule}"),
            "",
            "acme | domain acme.com (CUSTOMER, virtual account (account default)) | -",
        ),
        (
            format!("{partner_rule}{acme_rule}"),
            "",
            "partner | domain acme.com (CUSTOMER, virtual account (account default)) \
             | domain globex-holding.com (HOLDING, virtual account Holding)",
        ),
        // the second rule when the first fails
        (
            format!("{acme_rule}{partner_rule}"),
            "domain=initech.com",
            "partner | domain initech.com (CUSTOMER, virtual account (account default)) \
             | domain globex-holding.com (HOLDING, virtual account Holding)",
        ),
        // no rule matches
        (
            format!("{acme_rule}{partner_rule}"),
            "domain=initech.com partner=P-7",
            "none",
        ),
        (String::new(), "", "none"),
        // `from` without an e-mail: the rule cannot build a target, the next is tried
        (
            format!("{partner_rule}{acme_rule}{}", rule("fixed", "", ACME, None)),
            "domain=-",
            "fixed | domain acme.com (CUSTOMER, virtual account (account default)) | -",
        ),
        (
            format!("{partner_rule}{catch_all}"),
            "domain=- partner=P-7",
            "none",
        ),
        // `from` takes the e-mail's domain, lower-case
        (
            catch_all.clone(),
            "email=Buyer@Initech.COM",
            "catch-all | domain initech.com (CUSTOMER, virtual account (account default)) | -",
        ),
        // the other selectors and a named virtual account
        (
            rule(
                "by-name",
                "",
                "smart_account = { name = \"Acme Corp\" }\naccount_type = \"customer\"\nvirtual_account = \"DEFAULT\"",
                None,
            ),
            "",
            "by-name | name \"Acme Corp\" (CUSTOMER, virtual account DEFAULT) | -",
        ),
        (
            rule(
                "by-email",
                "",
                "smart_account = { email = \"Licensing@Globex-Holding.com\" }\naccount_type = \"HOLDING\"",
                Some("smart_account = { name = \"Globex\" }\naccount_type = \"HOLDING\""),
            ),
            "",
            "by-email | e-mail Licensing@globex-holding.com (HOLDING, virtual account (account default)) \
             | name \"Globex\" (HOLDING, virtual account (account default))",
        ),
    ];
    for (text, spec, expected) in &cases {
        let rules = parse(text).unwrap_or_else(|e| panic!("{text}\n{e}"));
        let o = order(spec);
        let got = match rules.decide(&o) {
            None => "none".to_owned(),
            Some(d) => {
                assert_eq!(d.rules_hash, rules.hash());
                let fallback = d.fallback.map_or("-".to_owned(), |f| f.to_string());
                format!("{} | {} | {fallback}", d.rule, d.target)
            }
        };
        assert_eq!(&got, expected, "order {spec:?} with\n{text}");
        assert_eq!(
            rules.explain(&o).decision,
            rules.decide(&o),
            "explain agrees: {spec:?}\n{text}"
        );
    }
}

#[test]
fn explain_marks_rules_after_the_match_not_tried_and_names_the_missing_email() {
    let text = format!(
        "{}{}{}",
        rule("partner", "partner_id = [\"P-100\"]", FROM, Some(HOLDING)),
        rule("acme", "", ACME, None),
        rule("later", "", ACME, None)
    );
    let rules = parse(&text).expect("valid rules");
    let e = rules.explain(&order("domain=-"));
    let verdicts: Vec<String> = e.rules.iter().map(|r| verdict(&r.outcome)).collect();
    assert_eq!(
        verdicts,
        ["fail assign.smart_account.from", "match", "not tried"]
    );
    assert_eq!(
        e.rules.iter().map(|r| r.line).collect::<Vec<_>>(),
        [1, 12, 17]
    );
    let shown = e.to_string();
    assert!(shown.contains("#1 partner (line 1): no match"), "{shown}");
    assert!(shown.contains("no end-customer e-mail"), "{shown}");
    assert!(shown.contains("#2 acme (line 12): MATCHED"), "{shown}");
    assert!(shown.contains("#3 later (line 17): not tried"), "{shown}");
    assert!(shown.contains("Decision: rule \"acme\""), "{shown}");

    let fallthrough = rules.explain(&order("domain=- partner=- fam=-"));
    let no_partner = parse(&rule("p", "partner_id = [\"P-100\"]", ACME, None))
        .expect("valid")
        .explain(&order("partner=-"));
    let json = serde_json::to_value(no_partner).expect("serialisable");
    assert_eq!(json["rules"][0]["outcome"], "failed");
    assert_eq!(json["rules"][0]["failures"][0]["key"], "when.partner_id");
    assert_eq!(json["rules"][0]["failures"][0]["wanted"][0], "P-100");
    assert_eq!(
        json["rules"][0]["failures"][0]["event"],
        serde_json::json!([])
    );
    assert!(json["decision"].is_null());
    assert_eq!(
        fallthrough.decision.map(|d| d.rule),
        Some("acme".to_owned())
    );
}

#[test]
fn no_rule_matching_is_explained() {
    let rules = parse(&rule(
        "acme",
        "end_customer_domain = [\"acme.com\"]",
        ACME,
        None,
    ))
    .expect("valid");
    let shown = rules.explain(&order("domain=initech.com")).to_string();
    assert!(
        shown.contains("when.end_customer_domain: wants acme.com; the order has initech.com"),
        "{shown}"
    );
    assert!(
        shown.contains("no rule matched; the order escalates NO_RULE_MATCHED"),
        "{shown}"
    );
}

#[test]
fn every_mistake_names_file_rule_key_and_line() {
    let ok =
        "[rule.assign]\nsmart_account = { domain = \"acme.com\" }\naccount_type = \"CUSTOMER\"\n";
    let first = format!("[[rule]]\nname = \"first\"\n{ok}"); // 5 lines
    // (file text, substrings the message must contain)
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("{first}[[rule]]\nname = \"b\"\n[rule.when]\ncontry = [\"US\"]\n{ok}"),
            vec!["rules.toml:9: rule #2 \"b\": unknown key `when.contry`", "expected one of", "`country`"],
        ),
        (
            format!("[[rule]]\nnmae = \"a\"\n{ok}"),
            vec!["rules.toml:2: rule #1 (unnamed): unknown key `nmae`"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\nsmart_account = { dommain = \"acme.com\" }\naccount_type = \"CUSTOMER\"\n".to_owned(),
            vec!["rules.toml:4: rule #1 \"a\": unknown key `assign.smart_account.dommain`"],
        ),
        (
            format!("{first}[[rules]]\nname = \"b\"\n"),
            vec!["rules.toml:6: unknown key `rules`"],
        ),
        (
            format!("{first}[[rule]]\nname = \"\"\n{ok}"),
            vec!["rules.toml:7: rule #2 (unnamed): `name` is empty"],
        ),
        (
            format!("{first}[[rule]]\n{ok}"),
            vec!["rules.toml:6: rule #2 (unnamed): `name` is required"],
        ),
        (
            format!("{first}[[rule]]\nname = \"first\"\n{ok}"),
            vec!["rules.toml:6: rule #2 \"first\": `name` \"first\" is already the name of rule #1 (line 1)"],
        ),
        (
            format!("{first}[[rule]]\nname = \"g\"\n[rule.when]\nend_customer_domain = [\"acme.com\",\n  \"acme.[cn]om\"]\n{ok}"),
            vec!["rules.toml:10: rule #2 \"g\": `when.end_customer_domain`: bad domain pattern \"acme.[cn]om\"", "only wildcard"],
        ),
        (
            format!("[[rule]]\nname = \"g\"\n[rule.when]\nend_customer_domain = [\"*..acme.com\"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"g\": `when.end_customer_domain`: bad domain pattern \"*..acme.com\"", "not a domain pattern"],
        ),
        (
            format!("[[rule]]\nname = \"g\"\n[rule.when]\nend_customer_domain = [\"*.{{acme,globex}}.com\"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"g\": `when.end_customer_domain`: bad domain pattern \"*.{acme,globex}.com\"", "'{' is not allowed"],
        ),
        (
            format!("{first}[[rule]]\nname = \"no-assign\"\n[rule.when]\ncountry = [\"US\"]\n"),
            vec!["rules.toml:6: rule #2 \"no-assign\": `assign` is missing"],
        ),
        (
            "[[rule]]\nname = \"f\"\n[rule.assign]\nsmart_account = { from = \"partner_domain\" }\naccount_type = \"CUSTOMER\"\n".into(),
            vec!["rules.toml:4: rule #1 \"f\": `assign.smart_account.from`: from = \"partner_domain\" is not supported"],
        ),
        (
            format!("[[rule]]\nname = \"f\"\n{ok}[rule.fallback]\naccount_type = \"HOLDING\"\n"),
            vec!["rules.toml:6: rule #1 \"f\": `fallback.smart_account` is required"],
        ),
        (
            format!("[[rule]]\nname = \"f\"\n{ok}[rule.fallback]\nsmart_account = {{ from = \"end_customer_domain\" }}\naccount_type = \"HOLDING\"\n"),
            vec!["rules.toml:7: rule #1 \"f\": `fallback.smart_account.from`: a fallback names a fixed account"],
        ),
        (
            format!("{first}[[rule]]\nname = \"s\n"),
            vec!["rules.toml:7: rule #2", "not valid TOML"],
        ),
        (
            format!("[[rule]]\nname = \"t\"\n[rule.when]\ncountry = \"US\"\n{ok}"),
            vec!["rules.toml:4: rule #1 \"t\": `when.country`: invalid type"],
        ),
        (
            format!("[[rule]]\nname = \"e\"\n[rule.when]\ncountry = []\n{ok}"),
            vec!["rules.toml:4: rule #1 \"e\": `when.country` is an empty list, which matches no order"],
        ),
        (
            format!("[[rule]]\nname = \"e\"\n[rule.when]\nend_customer_domain = []\n{ok}"),
            vec!["rules.toml:4: rule #1 \"e\": `when.end_customer_domain` is an empty list"],
        ),
        (
            format!("[[rule]]\nname = \"c\"\n[rule.when]\ncountry = [\"US\", \"USA\"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"c\": `when.country`: \"USA\" is not a two-letter country code"],
        ),
        (
            format!("[[rule]]\nname = \"h\"\n[rule.when]\nhold_reason = [\"CREDIT_HOLD\"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"h\": `when.hold_reason`: \"CREDIT_HOLD\" is not a hold reason"],
        ),
        (
            format!("[[rule]]\nname = \"o\"\n[rule.when]\norder_type = [\"STAND ARD\"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"o\": `when.order_type`"],
        ),
        (
            format!("[[rule]]\nname = \"p\"\n[rule.when]\npartner_id = [\" \"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"p\": `when.partner_id`: an empty string matches nothing"],
        ),
        (
            format!("[[rule]]\nname = \"d\"\n[rule.when]\nend_customer_domain = [\"acme..com\"]\n{ok}"),
            vec!["rules.toml:4: rule #1 \"d\": `when.end_customer_domain`: \"acme..com\" is not a domain"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\nsmart_account = { domain = \"acme.com\" }\naccount_type = \"PARTNER\"\n".into(),
            vec!["rules.toml:5: rule #1 \"a\": `assign.account_type`: \"PARTNER\" is neither CUSTOMER nor HOLDING"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\nsmart_account = { domain = \"acme.com\" }\n".into(),
            vec!["rules.toml:3: rule #1 \"a\": `assign.account_type` is required"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\naccount_type = \"CUSTOMER\"\n".into(),
            vec!["rules.toml:3: rule #1 \"a\": `assign.smart_account` is required"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\nsmart_account = { domain = \"acme.com\", name = \"Acme\" }\naccount_type = \"CUSTOMER\"\n".into(),
            vec!["rules.toml:4: rule #1 \"a\": `assign.smart_account`: takes exactly one of domain, name, email or from; 2 given"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\nsmart_account = { domain = \"*.acme.com\" }\naccount_type = \"CUSTOMER\"\n".into(),
            vec!["rules.toml:4: rule #1 \"a\": `assign.smart_account.domain`: an account domain is exact"],
        ),
        (
            "[[rule]]\nname = \"a\"\n[rule.assign]\nsmart_account = { email = \"nobody\" }\naccount_type = \"CUSTOMER\"\n".into(),
            vec!["rules.toml:4: rule #1 \"a\": `assign.smart_account.email`"],
        ),
        (
            format!("[[rule]]\nname = \"v\"\n{ok}virtual_account = \"\"\n"),
            vec!["rules.toml:6: rule #1 \"v\": `assign.virtual_account`: an empty string"],
        ),
    ];
    for (text, needles) in &cases {
        let err = match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        for needle in needles {
            assert!(
                err.contains(needle),
                "expected {needle:?} in\n  {err}\nfor\n{text}"
            );
        }
    }
}

#[test]
fn an_unreadable_file_is_named() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let missing = dir.path().join("missing.toml");
    let err = Rules::load(&missing).expect_err("missing file").to_string();
    assert!(
        err.contains("missing.toml: cannot read the rules file"),
        "{err}"
    );

    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, [0xff, 0xfe, b'\n']).expect("write");
    let err = Rules::load(&binary).expect_err("not UTF-8").to_string();
    assert!(
        err.contains("binary.toml: cannot read the rules file"),
        "{err}"
    );
    assert!(err.contains("UTF-8"), "{err}");
}

#[test]
fn hash_is_sha256_of_the_content_and_len_counts_rules() {
    let text = format!("{}{}", rule("a", "", ACME, None), rule("b", "", ACME, None));
    let rules = parse(&text).expect("valid");
    assert_eq!(rules.len(), 2);
    assert!(!rules.is_empty());
    assert_eq!(rules.names().collect::<Vec<_>>(), ["a", "b"]);
    use sha2::Digest;
    assert_eq!(
        rules.hash(),
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    );
    let changed = parse(&format!("# a comment\n{text}")).expect("valid");
    assert_ne!(changed.hash(), rules.hash());
    let empty = parse("# no rules yet\n").expect("an empty file is valid");
    assert!(empty.is_empty());
    assert_eq!(empty.decide(&order("")), None);
}

#[test]
fn the_example_file_loads_and_decides_the_sample_orders() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/rules.toml");
    let rules = Rules::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rules.names().collect::<Vec<_>>(),
        ["acme-direct", "globex-partner-holding", "any-end-customer"]
    );
    let cases = [
        ("domain=eu.acme.com partner=-", Some("acme-direct")),
        (
            "domain=initech.com reason=PENDING",
            Some("globex-partner-holding"),
        ),
        ("domain=umbrella.de partner=-", Some("any-end-customer")),
        ("domain=- partner=-", None),
    ];
    for (spec, expected) in cases {
        let d = rules.decide(&order(spec));
        assert_eq!(d.as_ref().map(|d| d.rule.as_str()), expected, "{spec}");
    }
    let d = rules
        .decide(&order("domain=initech.com"))
        .expect("a decision");
    assert_eq!(
        d.target.to_string(),
        "domain initech.com (CUSTOMER, virtual account (account default))"
    );
    assert_eq!(
        d.fallback.map(|f| f.to_string()).as_deref(),
        Some("domain globex-holding.com (HOLDING, virtual account Holding)")
    );
}

mod reload {
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::*;

    #[test]
    fn a_bad_file_keeps_the_rules_in_force() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule("one", "", ACME, None)).expect("write");
        let handle = RulesHandle::new(Rules::load(&path).expect("valid"));
        let held = handle.current();
        assert_eq!(held.len(), 1);

        std::fs::write(
            &path,
            format!(
                "{}{}",
                rule("one", "", ACME, None),
                rule("two", "", ACME, None)
            ),
        )
        .expect("write");
        handle.reload(&path).expect("valid reload");
        assert_eq!(handle.current().len(), 2);
        assert_eq!(
            held.len(),
            1,
            "a decision in progress keeps the rules it started with"
        );
        let good_hash = handle.current().hash().to_owned();

        std::fs::write(&path, "[[rule]]\nname = \"\"\n").expect("write");
        let err = handle.reload(&path).expect_err("an invalid file");
        assert!(err.to_string().contains("`name` is empty"), "{err}");
        assert_eq!(
            handle.current().hash(),
            good_hash,
            "the rules in force stay"
        );

        let clone = handle.clone();
        std::fs::write(&path, rule("three", "", ACME, None)).expect("write");
        clone.reload(&path).expect("valid reload");
        assert_eq!(
            handle.current().names().collect::<Vec<_>>(),
            ["three"],
            "clones share the rules"
        );
    }

    /// A SIGHUP that arrives after the stream listens but before the
    /// reload task runs (a worker still starting) waits in the stream: the
    /// task reloads as soon as it runs, without a second SIGHUP.
    #[tokio::test]
    async fn a_sighup_before_the_reload_task_runs_is_a_reload() {
        let hangups = super::super::listen_for_hangups().expect("listen for SIGHUP");
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule("one", "", ACME, None)).expect("write");
        let handle = RulesHandle::new(Rules::load(&path).expect("valid"));
        std::fs::write(&path, rule("two", "", ACME, None)).expect("write");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise SIGHUP");
        let cancel = CancellationToken::new();
        let task = tokio::spawn(handle.clone().reload_on_sighup(
            path.clone(),
            hangups,
            cancel.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !handle.current().names().any(|n| n == "two") {
            assert!(Instant::now() < deadline, "the early SIGHUP was lost");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when cancelled")
            .expect("no panic");
    }

    #[test]
    fn the_shadow_rules_reload_with_the_rules_in_force_or_neither_does() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (path, shadow) = (
            dir.path().join("rules.toml"),
            dir.path().join("shadow.toml"),
        );
        std::fs::write(&path, rule("one", "", ACME, None)).expect("write");
        std::fs::write(&shadow, rule("shadow-one", "", ACME, None)).expect("write");
        let handle = RulesHandle::load(&path, Some(&shadow)).expect("both valid");
        let names = |r: Option<std::sync::Arc<Rules>>| -> Vec<String> {
            r.map(|r| r.names().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        assert_eq!(names(handle.shadow()), ["shadow-one"]);

        std::fs::write(&path, rule("two", "", ACME, None)).expect("write");
        std::fs::write(&shadow, "[[rule]]\nname = \"\"\n").expect("write");
        let err = handle.reload(&path).expect_err("a bad shadow file");
        assert!(err.to_string().contains("shadow.toml"), "{err}");
        assert_eq!(names(Some(handle.current())), ["one"], "neither changes");
        assert_eq!(names(handle.shadow()), ["shadow-one"]);

        std::fs::write(&shadow, rule("shadow-two", "", ACME, None)).expect("write");
        handle.reload(&path).expect("both valid");
        assert_eq!(names(Some(handle.current())), ["two"]);
        assert_eq!(names(handle.shadow()), ["shadow-two"]);

        let err = RulesHandle::load(&path, Some(&dir.path().join("missing.toml")))
            .expect_err("a missing shadow file");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[tokio::test]
    async fn sighup_reloads_until_cancelled() {
        // Listening first installs the handler, so a SIGHUP can never take
        // the default action (terminate) in this test process.
        let hangups = super::super::listen_for_hangups().expect("listen for SIGHUP");

        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule("one", "", ACME, None)).expect("write");
        let handle = RulesHandle::new(Rules::load(&path).expect("valid"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(handle.clone().reload_on_sighup(
            path.clone(),
            hangups,
            cancel.clone(),
        ));

        let hup_until = |want: &'static str| {
            let handle = handle.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP)
                        .expect("raise SIGHUP");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if handle.current().names().any(|n| n == want) {
                        return;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "no reload to {want:?} within 10s"
                    );
                }
            }
        };
        std::fs::write(&path, rule("two", "", ACME, None)).expect("write");
        hup_until("two").await;

        std::fs::write(&path, "not = [valid").expect("write");
        for _ in 0..5 {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise SIGHUP");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            handle.current().names().collect::<Vec<_>>(),
            ["two"],
            "a bad file keeps the rules"
        );

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when cancelled")
            .expect("no panic");
    }
}

mod props {
    use proptest::prelude::*;

    use super::super::model;
    use super::*;

    fn pick<T: Clone + std::fmt::Debug>(values: &'static [T]) -> impl Strategy<Value = T> {
        proptest::sample::select(values)
    }

    const DOMAINS: &[&str] = &[
        "acme.com",
        "eu.acme.com",
        "initech.com",
        "globex.io",
        "a.b.c.example",
        "a.example",
    ];
    const PATTERNS: &[&str] = &[
        "acme.com",
        "*.acme.com",
        "initech.com",
        "*",
        "*.io",
        "a.*.example",
        "globex.*",
        "*acme*",
        "ACME.com",
    ];
    const PARTNERS: &[&str] = &["P-100", "p-100", "P-200", " P-300 "];
    const COUNTRIES: &[&str] = &["US", "CA", "DE", "fr"];
    const REASONS: &[&str] = &["NO_SMART_ACCOUNT", "PENDING_SMART_ACCOUNT"];
    const TYPES: &[&str] = &["STANDARD", "EA", "STOCKING"];
    const FAMILIES: &[&str] = &["C9300", "c9200", "ISR4000", ""];

    /// Arbitrary orders: any field may be missing; free-text fields arbitrary.
    fn any_order() -> impl Strategy<Value = HeldOrder> {
        (
            proptest::option::of(prop_oneof![
                pick(DOMAINS).prop_map(str::to_owned),
                "[a-z]{1,8}\\.[a-z]{2,3}"
            ]),
            proptest::option::of(prop_oneof![
                pick(PARTNERS).prop_map(str::to_owned),
                any::<String>()
            ]),
            proptest::option::of(pick(COUNTRIES)),
            any::<bool>(),
            proptest::option::of(pick(TYPES)),
            proptest::collection::vec(
                proptest::option::of(prop_oneof![
                    pick(FAMILIES).prop_map(str::to_owned),
                    any::<String>()
                ]),
                0..4,
            ),
        )
            .prop_map(
                |(domain, partner, country, pending, order_type, families)| HeldOrder {
                    order: OrderId::new(SalesOrderNumber::parse("1").ok(), None)
                        .expect("an order number"),
                    purchase_order_number: None,
                    hold_reason: if pending {
                        HoldReason::PendingSmartAccount
                    } else {
                        HoldReason::NoSmartAccount
                    },
                    held_at: None,
                    order_type: order_type.and_then(|t| OrderType::parse(t).ok()),
                    partner: partner.map(|id| Partner {
                        id: Some(id),
                        name: None,
                    }),
                    end_customer: Some(EndCustomer {
                        name: None,
                        email: domain.and_then(|d| Email::parse(&format!("x@{d}")).ok()),
                        country: country.and_then(|c| CountryCode::parse(c).ok()),
                    }),
                    smart_account: None,
                    lines: families
                        .into_iter()
                        .map(|f| Line {
                            line_number: None,
                            sku: None,
                            product_family: f,
                        })
                        .collect(),
                },
            )
    }

    fn toml_list(values: &[&str]) -> String {
        let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// The `when` body and `assign` body of an arbitrary valid rule.
    fn any_rule() -> impl Strategy<Value = (String, bool)> {
        let list = |values: &'static [&'static str]| {
            proptest::option::of(proptest::sample::subsequence(
                values,
                1..=values.len().min(3),
            ))
        };
        let families: &'static [&'static str] = &FAMILIES[..3];
        (
            list(PATTERNS),
            list(&PARTNERS[..3]),
            list(COUNTRIES),
            list(REASONS),
            list(TYPES),
            list(families),
            any::<bool>(),
        )
            .prop_map(|(d, p, c, r, t, f, from)| {
                let mut when = String::new();
                for (key, values) in [
                    ("end_customer_domain", d),
                    ("partner_id", p),
                    ("country", c),
                    ("hold_reason", r),
                    ("order_type", t),
                    ("product_family", f),
                ] {
                    if let Some(v) = values {
                        when += &format!("{key} = {}\n", toml_list(&v));
                    }
                }
                (when, from)
            })
    }

    fn file(rules: &[(String, bool)], offset: usize) -> String {
        rules
            .iter()
            .enumerate()
            .map(|(i, (when, from))| {
                let assign = if *from { FROM } else { ACME };
                rule(
                    &format!("r{}", i + offset),
                    when,
                    assign,
                    (!from).then_some(HOLDING),
                )
            })
            .collect()
    }

    /// `*`-only wildcard match, written independently of globset.
    fn wildcard(pattern: &str, text: &str) -> bool {
        let parts: Vec<&str> = pattern.split('*').collect();
        let (first, rest) = parts.split_first().expect("split yields one part");
        let Some(mut tail) = text.strip_prefix(first) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return tail.is_empty();
        };
        for part in middle {
            match tail.find(part) {
                Some(at) => tail = &tail[at + part.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last)
    }

    /// The documented semantics, rule by rule with strings: the oracle the
    /// bitset matcher is checked against.
    fn reference(rules: &Rules, o: &HeldOrder) -> Option<String> {
        let domain = o.end_customer_domain().map(|d| d.to_string());
        let partner = o
            .partner
            .as_ref()
            .and_then(|p| p.id.as_deref())
            .map(str::trim)
            .filter(|p| !p.is_empty());
        let customer = o.end_customer.as_ref();
        let country = customer.and_then(|c| c.country.as_ref());
        let families: Vec<&str> = o
            .lines
            .iter()
            .filter_map(|l| l.product_family.as_deref())
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        rules.rules.iter().find_map(|r| {
            let w = &r.when;
            let ok = w.end_customer_domain.as_ref().is_none_or(|d| {
                domain.as_deref().is_some_and(|dom| {
                    d.exact.iter().any(|e| e.as_str() == dom)
                        || d.patterns.iter().any(|p| wildcard(p, dom))
                })
            }) && w.partner_id.as_ref().is_none_or(|ps| {
                partner.is_some_and(|id| ps.iter().any(|p| p.eq_ignore_ascii_case(id)))
            }) && w
                .country
                .as_ref()
                .is_none_or(|cs| country.is_some_and(|c| cs.contains(c)))
                && w.hold_reason
                    .as_ref()
                    .is_none_or(|rs| rs.contains(&o.hold_reason))
                && w.order_type
                    .as_ref()
                    .is_none_or(|ts| o.order_type.as_ref().is_some_and(|t| ts.contains(t)))
                && w.product_family.as_ref().is_none_or(|fs| {
                    families
                        .iter()
                        .any(|f| fs.iter().any(|w| w.eq_ignore_ascii_case(f)))
                })
                && (r.assign.account != model::AccountSource::EndCustomerDomain
                    || domain.is_some());
            ok.then(|| r.name.clone())
        })
    }

    #[test]
    fn the_wildcard_oracle_itself() {
        let cases = [
            ("*.acme.com", "x.acme.com", true),
            ("*.acme.com", "a.b.acme.com", true),
            ("*.acme.com", "acme.com", false),
            ("acme.*", "acme.de", true),
            ("a.*.example", "a.b.c.example", true),
            ("a.*.example", "a.example", false),
            ("*", "x.io", true),
            ("*ab*ab", "abab", true),
            ("*ab*ab", "aab", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(wildcard(p, t), want, "{p} vs {t}");
        }
    }

    proptest! {
        #[test]
        fn decide_never_panics_and_agrees_with_explain_and_the_oracle(
            rules in proptest::collection::vec(any_rule(), 0..70),
            o in any_order(),
        ) {
            let compiled = parse(&file(&rules, 0)).expect("generated rules are valid");
            let decided = compiled.decide(&o);
            prop_assert_eq!(decided.as_ref().map(|d| d.rule.clone()), reference(&compiled, &o));
            let explained = compiled.explain(&o);
            prop_assert_eq!(&decided, &explained.decision);
            let _ = explained.to_string();
            let matched: Vec<usize> = explained.rules.iter().enumerate()
                .filter(|(_, r)| r.outcome == Outcome::Matched).map(|(i, _)| i).collect();
            prop_assert!(matched.len() <= 1);
            for r in &explained.rules {
                if let Outcome::Failed { failures } = &r.outcome {
                    prop_assert!(!failures.is_empty(), "rule {} failed without a reason", r.name);
                }
            }
            if let Some(d) = &decided {
                prop_assert_eq!(&explained.rules[matched[0]].name, &d.rule);
                // every rule before the match failed
                for r in &explained.rules[..matched[0]] {
                    let failed = matches!(r.outcome, Outcome::Failed { .. });
                    prop_assert!(failed);
                }
            }
        }

        #[test]
        fn appending_rules_after_the_match_changes_nothing(
            rules in proptest::collection::vec(any_rule(), 1..6),
            more in proptest::collection::vec(any_rule(), 1..6),
            o in any_order(),
        ) {
            let before = parse(&file(&rules, 0)).expect("valid");
            let after = parse(&format!("{}{}", file(&rules, 0), file(&more, rules.len()))).expect("valid");
            if let Some(d) = before.decide(&o) {
                let e = after.decide(&o).expect("still decided");
                prop_assert_eq!((&d.rule, &d.target, &d.fallback), (&e.rule, &e.target, &e.fallback));
                prop_assert_eq!(e.rules_hash.as_str(), after.hash());
            }
        }
    }
}

mod suggest {
    use super::*;

    fn chosen(domain: &str, va: Option<&str>) -> Chosen {
        Chosen {
            smart_account_domain: domain.into(),
            virtual_account: va.map(str::to_owned),
        }
    }

    /// Fixes (order key, order spec, account) → the suggestions' names,
    /// the groups too few, the groups that disagree.
    #[test]
    fn fixes_become_rules_only_when_enough_of_them_agree() {
        let mut learner = Learner::default();
        let fixes = [
            (
                "1",
                "partner=P-500 domain=umbrella.example country=DE",
                "globex-holding.com",
            ),
            (
                "2",
                "partner=P-500 domain=umbrella.example country=DE",
                "globex-holding.com",
            ),
            (
                "3",
                "partner=P-500 domain=umbrella.example country=DE",
                "globex-holding.com",
            ),
            (
                "4",
                "partner=P-600 domain=x.example country=FR",
                "x.example",
            ),
            (
                "5",
                "partner=P-700 domain=y.example country=US",
                "a.example",
            ),
            (
                "6",
                "partner=P-700 domain=y.example country=US",
                "b.example",
            ),
            ("7", "partner=- domain=- country=-", "a.example"),
        ];
        for (key, spec, account) in fixes {
            learner.add(key, &order(spec), chosen(account, Some("DEFAULT")));
        }
        let learned = learner.finish(2, ["learned-p-500-umbrella-example-de"]);
        assert_eq!(learned.fixes, 7);
        let names: Vec<&str> = learned
            .suggestions
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["learned-p-500-umbrella-example-de-2"],
            "a name in force is not reused"
        );
        let s = &learned.suggestions[0];
        assert_eq!(
            (s.fixes, s.orders.clone()),
            (3, vec!["1".into(), "2".into(), "3".into()])
        );
        assert_eq!(s.account_type, "HOLDING");
        let too_few: Vec<(String, u64)> = (learned.too_few.iter())
            .map(|t| (t.when.describe(), t.fixes))
            .collect();
        assert_eq!(
            too_few,
            [(
                "partner P-600, end customer domain x.example, country FR".to_owned(),
                1
            )]
        );
        let disagreeing: Vec<String> = (learned.disagreements.iter())
            .map(|d| d.when.describe())
            .collect();
        assert_eq!(
            disagreeing,
            [
                "",
                "partner P-700, end customer domain y.example, country US"
            ],
            "an order with nothing to match, and fixes to two accounts"
        );
    }

    /// The TOML of a suggestion is a valid rules file on its own, and it
    /// decides the orders it learned from as the person did.
    #[test]
    fn a_suggestion_is_a_valid_rule_that_decides_like_the_person() {
        let mut learner = Learner::default();
        let spec = "partner=P-1\"x domain=acme.com country=CA";
        for key in ["1", "2"] {
            learner.add(key, &order(spec), chosen("acme.com", None));
        }
        let learned = learner.finish(2, []);
        let s = &learned.suggestions[0];
        assert_eq!(s.account_type, "CUSTOMER", "the end customer's own domain");
        let rules = parse(&s.toml).unwrap_or_else(|e| panic!("{e}\n{}", s.toml));
        let d = rules.decide(&order(spec)).expect("it matches");
        assert_eq!(d.rule, s.name);
        assert_eq!(
            d.target.to_string(),
            "domain acme.com (CUSTOMER, virtual account (account default))"
        );
        assert!(
            rules
                .decide(&order("partner=P-1\"x domain=acme.com country=US"))
                .is_none()
        );
    }
}
