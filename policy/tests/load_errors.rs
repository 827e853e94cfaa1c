//! The loader: every class of invalid input is reported with file, line, column and
//! field, and a set with any error is rejected whole.

mod common;

use common::load_str;
use segmesh_policy::{Action, Mode, Source, Tier, load};

/// Loads `yaml` as `t.yaml` and returns `line:col field message` for each diagnostic.
fn errors(yaml: &str) -> Vec<String> {
    let e = load(&[Source {
        name: "t.yaml",
        text: yaml,
    }])
    .expect_err("input should be rejected");
    e.diagnostics
        .iter()
        .map(|d| {
            assert_eq!(d.location.file, "t.yaml");
            format!(
                "{}:{} {} {}",
                d.location.line,
                d.location.column,
                d.field.clone().unwrap_or_default(),
                d.message
            )
        })
        .collect()
}

fn assert_one(yaml: &str, at: &str, field: &str, message: &str) {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let want = format!("{at} {field} ");
    assert!(
        errs[0].starts_with(&want),
        "want `{want}…`, got `{}`",
        errs[0]
    );
    assert!(
        errs[0].contains(message),
        "want `{message}` in `{}`",
        errs[0]
    );
}

const GOOD: &str = "kind: NetworkPolicy\nname: p\naction: Allow\nmode: Bidirectional\nsubject: [[app=a]]\nobject: [[app=b]]\n";

#[test]
fn syntax_error() {
    assert_one(
        "kind: NetworkPolicy\nname: [p\n",
        "3:1",
        "",
        "YAML syntax error",
    );
}

#[test]
fn unknown_and_missing_fields() {
    assert_one(
        &format!("{GOOD}colour: blue\n"),
        "7:1",
        "colour",
        "unknown field `colour`",
    );
    assert_one(
        "kind: NetworkPolicy\nname: p\naction: Allow\nmode: Incoming\nsubject: [[a=b]]\n",
        "1:1",
        "object",
        "missing required field `object`",
    );
    assert_one("name: p\n", "1:1", "kind", "missing required field `kind`");
    assert_one("kind: Policy\n", "1:7", "kind", "unknown kind `Policy`");
    assert_one(
        &format!("{GOOD}name: q\n"),
        "7:1",
        "name",
        "duplicate field",
    );
}

#[test]
fn bad_values() {
    assert_one(
        &GOOD.replace("Allow", "Permit"),
        "3:9",
        "action",
        "expected one of Allow, Reject",
    );
    assert_one(
        &GOOD.replace("app=a", "app"),
        "5:12",
        "subject[0][0]",
        "expected `key=value`",
    );
    assert_one(&GOOD.replace("app=a", "=a"), "5:12", "subject[0][0]", "key");
    assert_one(
        &GOOD.replace("[[app=a]]", "[app=a]"),
        "5:11",
        "subject[0]",
        "a selector is a list of lists",
    );
    assert_one(
        &GOOD.replace("[[app=a]]", "[[]]"),
        "5:11",
        "subject[0]",
        "empty clause",
    );
    assert_one(
        &GOOD.replace("[[app=a]]", "[]"),
        "5:10",
        "subject",
        "matches nothing",
    );
    assert_one(
        &format!("{GOOD}ports: [tcp/80, sctp/53]\n"),
        "7:17",
        "ports[1]",
        "the protocols are tcp, udp and icmp",
    );
    assert_one(
        &format!("{GOOD}ports: [tcp/0]\n"),
        "7:9",
        "ports[0]",
        "1 to 65535",
    );
    assert_one(
        &format!("{GOOD}ports: [tcp/9-1]\n"),
        "7:9",
        "ports[0]",
        "start is above its end",
    );
    assert_one(
        &format!("{GOOD}ports: [80]\n"),
        "7:9",
        "ports[0]",
        "expected `tcp/N`",
    );
    assert_one(
        &format!("{GOOD}tier: urgent\n"),
        "7:7",
        "tier",
        "expected one of emergency",
    );
    assert_one(
        &format!("{GOOD}enforce: yes\n"),
        "7:10",
        "enforce",
        "expected `true` or `false`",
    );
    assert_one(
        &format!("{GOOD}namespace: acme\n"),
        "7:12",
        "namespace",
        "starts with `/`",
    );
    assert_one(
        &GOOD.replace("name: p", "name: 'a b'"),
        "2:7",
        "name",
        "names use",
    );
}

#[test]
fn bad_external_entries() {
    let ext = |entry: &str| format!("kind: ExternalNetwork\nname: e\nentries: [\"{entry}\"]\n");
    for bad in [
        "*",
        "googleapis*.com",
        "googleapis.*",
        "*.*.example.com",
        "a.*.example.com",
    ] {
        assert_one(
            &ext(bad),
            "3:11",
            "entries[0]",
            "wildcard is allowed only as the whole first label",
        );
    }
    for bad in [
        "10.0.0.0/33",
        "10.0.0.256",
        "fd00::/200",
        "not a host",
        "-x.example.com",
    ] {
        assert_one(
            &ext(bad),
            "3:11",
            "entries[0]",
            "is not an IP address, a CIDR or a domain name",
        );
    }
    assert_one(
        &ext("sctp/53"),
        "3:11",
        "entries[0]",
        "the protocols are tcp, udp and icmp",
    );
    assert_one(
        "kind: ExternalNetwork\nname: e\nentries: []\n",
        "3:10",
        "entries",
        "at least one entry",
    );
    assert_one(
        "kind: ExternalNetwork\nname: e\ntags: [$identity=x]\nentries: [10.0.0.1]\n",
        "3:7",
        "tags",
        "set automatically",
    );
    // The accepted forms.
    let ok = load_str(
        "kind: ExternalNetwork\nname: e\nentries: [10.0.0.0/8, 10.1.2.3, \"fd00::/8\", \"*.example.com\", api.example.com, tcp/443]\n",
    );
    let e = &ok.set.externals()[0];
    assert_eq!(e.entries.len(), 5);
    assert_eq!(e.ports.to_string(), "tcp/443");
}

#[test]
fn modes_that_contradict_their_ends() {
    let p = |mode: &str, subject: &str, object: &str| {
        format!(
            "kind: NetworkPolicy\nname: p\naction: Allow\nmode: {mode}\nsubject: {subject}\nobject: {object}\n"
        )
    };
    assert_one(
        &p("Incoming", "[[app=a]]", "[[ext:name=internet]]"),
        "6:10",
        "object[0]",
        "Incoming policy is checked by the object's enforcer",
    );
    assert_one(
        &p("Outgoing", "[[$identity=externalnetwork]]", "[[app=a]]"),
        "5:11",
        "subject[0]",
        "Outgoing policy is checked by the subject's enforcer",
    );
    assert_one(
        &p("Bidirectional", "[[app=a]]", "[[app=b], [ext:name=x]]"),
        "6:19",
        "object[1]",
        "Bidirectional policy has processing units at both ends",
    );
    // The legal directions with external ends load.
    load_str(&p("Incoming", "[[ext:name=internet]]", "[[app=a]]"));
    load_str(&p("Outgoing", "[[app=a]]", "[[ext:name=internet]]"));
    // Ruleset rules are checked in their expanded form.
    let rs = "kind: NetworkRuleSet\nname: r\nsubject: [[ext:name=x]]\noutgoingRules:\n  - {action: Allow, object: [[app=a]]}\n";
    assert_one(rs, "3:11", "subject[0]", "Outgoing policy");
}

#[test]
fn duplicate_names_across_files() {
    let e = load(&[
        Source {
            name: "a.yaml",
            text: GOOD,
        },
        Source {
            name: "b.yaml",
            text: GOOD,
        },
    ])
    .unwrap_err();
    assert_eq!(e.diagnostics.len(), 1);
    let d = &e.diagnostics[0];
    assert_eq!((d.location.file.as_str(), d.location.line), ("b.yaml", 1));
    assert!(
        d.message.contains("first defined at a.yaml:1:1"),
        "{}",
        d.message
    );
    // The same name in another namespace is fine.
    let other = GOOD.replace("name: p", "name: p\nnamespace: /other");
    load(&[
        Source {
            name: "a.yaml",
            text: GOOD,
        },
        Source {
            name: "b.yaml",
            text: &other,
        },
    ])
    .unwrap();
    // Ruleset expansions share the policy name space.
    let rs = "kind: NetworkRuleSet\nname: r\nsubject: [[a=1]]\noutgoingRules: [{action: Allow, object: [[b=1]]}]\n";
    let clash = GOOD.replace("name: p", "name: r/out/0");
    assert!(
        load(&[
            Source {
                name: "a.yaml",
                text: rs
            },
            Source {
                name: "b.yaml",
                text: &clash
            }
        ])
        .is_err()
    );
}

#[test]
fn one_error_rejects_the_whole_set_and_all_errors_are_reported() {
    let yaml = format!(
        "{GOOD}---\n{}---\n{}",
        GOOD.replace("name: p", "name: q").replace("Allow", "Maybe"),
        GOOD.replace("name: p", "name: r").replace("app=b", "app")
    );
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("10:9 action"), "{}", errs[0]);
    assert!(errs[1].starts_with("20:11 object[0][0]"), "{}", errs[1]);
}

#[test]
fn rulesets_expand_into_policies() {
    let loaded = load_str(
        r#"
kind: NetworkRuleSet
name: frontend
namespace: /acme/shop
tier: environment
subject: [[app=frontend]]
outgoingRules:
  - {action: Allow, object: [[app=api]], ports: [tcp/8080]}
  - {action: Reject, object: [[app=db]], tier: emergency}
incomingRules:
  - {action: Allow, object: [[ext:name=internet]], ports: [tcp/443], encrypt: false}
"#,
    );
    let ps = loaded.set.policies();
    let names: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["frontend/in/0", "frontend/out/0", "frontend/out/1"]
    );
    let inc = &ps[0];
    assert_eq!(
        (inc.mode, inc.action, inc.tier, inc.encrypt),
        (Mode::Incoming, Action::Allow, Tier::Environment, false)
    );
    assert_eq!(inc.subject.to_string(), "[[ext:name=internet]]");
    assert_eq!(inc.object.to_string(), "[[app=frontend]]");
    let out = &ps[1];
    assert_eq!(
        (out.mode, out.subject.to_string(), out.object.to_string()),
        (
            Mode::Outgoing,
            "[[app=frontend]]".into(),
            "[[app=api]]".into()
        )
    );
    assert_eq!(ps[2].tier, Tier::Emergency);
    assert_eq!(ps[2].action, Action::Reject);
}

#[test]
fn namespace_default_tier_is_inherited() {
    let loaded = load_str(
        "kind: Namespace\nname: /a\ndefaultTier: environment\n---\nkind: NetworkPolicy\nname: p\nnamespace: /a/b\naction: Allow\nmode: Bidirectional\nsubject: [[x=1]]\nobject: [[y=1]]\n---\nkind: NetworkPolicy\nname: q\nnamespace: /a/b\ntier: emergency\naction: Allow\nmode: Bidirectional\nsubject: [[x=1]]\nobject: [[y=1]]\n",
    );
    let tiers: Vec<Tier> = loaded.set.policies().iter().map(|p| p.tier).collect();
    assert_eq!(tiers, vec![Tier::Environment, Tier::Emergency]);
}

#[test]
fn test_cases_are_validated() {
    let t = |case: &str| format!("kind: PolicyTest\ncases:\n  - {case}\n");
    assert_one(
        &t("{name: x, from: {ip: 1.2.3.4}, to: {ip: 5.6.7.8}, port: tcp/1, expect: allow}"),
        "3:5",
        "cases[0]",
        "at least one end must be a processing unit",
    );
    assert_one(
        &t("{name: x, from: [a=1], to: [b=1], port: tcp/1-2, expect: allow}"),
        "3:45",
        "cases[0].port",
        "single port",
    );
    assert_one(
        &t("{name: x, from: [a=1], to: [b=1], port: tcp/1, expect: maybe}"),
        "3:60",
        "cases[0].expect",
        "allow, reject",
    );
    assert_one(
        &t("{name: x, from: {ip: nope}, to: [b=1], port: tcp/1, expect: allow}"),
        "3:26",
        "cases[0].from.ip",
        "not an IP address",
    );
}

/// The attack: a 65,537-clause selector (it used to pass validation and panic
/// compilation) is a validation error at its position; so are the other bounds.
#[test]
fn sizes_are_bounded() {
    let clauses = vec!["[a=1]"; 65_537].join(", ");
    let yaml = format!(
        "kind: NetworkPolicy\nname: big\naction: Allow\nmode: Bidirectional\nsubject: [{clauses}]\nobject: [[b=1]]\n"
    );
    assert_one(
        &yaml,
        "5:10",
        "subject",
        "65537 clauses; a selector has at most 256",
    );
    let tags = (0..65)
        .map(|i| format!("t{i}=1"))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "kind: NetworkPolicy\nname: wide\naction: Allow\nmode: Bidirectional\nsubject: [[{tags}]]\nobject: [[b=1]]\n"
    );
    assert_one(
        &yaml,
        "5:11",
        "subject[0]",
        "65 tags; a clause has at most 64",
    );
    let ports = (1..=1025)
        .map(|p| format!("tcp/{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "kind: NetworkPolicy\nname: ports\naction: Allow\nmode: Bidirectional\nsubject: [[a=1]]\nobject: [[b=1]]\nports: [{ports}]\n"
    );
    assert_one(&yaml, "7:8", "ports", "1025 ports; a list has at most 1024");
}
