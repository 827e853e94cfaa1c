//! Fuzz target: the policy YAML loader (our own YAML reader included) and the engine
//! compiling what it accepts. Nothing a policy author writes may panic either.

use segmesh_policy::{Direction, Engine, FlowPort, Peer, Pu, Source, TagSet, load};

#[test]
fn fuzz_policy_loader() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/three-tier/");
    let seeds: Vec<Vec<u8>> = ["policies.yaml", "cases.yaml", "services.yaml"]
        .iter()
        .map(|f| std::fs::read(format!("{dir}{f}")).unwrap())
        .collect();
    let refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let dict: &[&[u8]] = &[
        b"\n- ",
        b": ",
        b"[[",
        b"]]",
        b"{",
        b"}",
        b"---\n",
        b"kind: ",
        b"'",
        b"\"",
        b"&a ",
        b"*a",
        b"!!str ",
        b"|\n",
        b">\n",
        b"\t",
        b"#",
        b"tcp/",
        b"udp/",
        b"65535",
        b"0.0.0.0/0",
        b"$namespace=*",
        b"*.",
        b"::/0",
    ];
    segmesh_testkit::fuzz::run("policy-loader", &refs, dict, |input| {
        let text = String::from_utf8_lossy(input);
        if let Ok(loaded) = load(&[Source {
            name: "fuzz.yaml",
            text: &text,
        }]) {
            let engine = Engine::compile(loaded.set);
            let pu = Pu::with_automatic_tags(
                "/acme/shop".parse().unwrap(),
                TagSet::parse(["app=web", "env=prod"]).unwrap(),
            );
            let prepared = engine.prepare_pu(&pu);
            let peer = engine.prepare_peer(&Peer::Pu(pu.tags.clone()));
            let _ = engine.decide(Direction::Outgoing, &prepared, &peer, FlowPort::tcp(8080));
        }
    });
}
