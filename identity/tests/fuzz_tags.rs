//! Fuzz target: the certificate tags extension (DER), which every enforcer parses from
//! a peer's certificate during the tunnel handshake. Decoding never panics; what decodes
//! encodes back to the same tags.

use segmesh_identity::tags;

#[test]
fn fuzz_tags_extension() {
    let seeds: Vec<Vec<u8>> = [
        vec!["app=web".to_owned(), "env=prod".to_owned()],
        vec![
            "$identity=processingunit".to_owned(),
            "$namespace=/acme/shop".to_owned(),
        ],
        vec![],
        vec!["k".repeat(200) + "=v"],
    ]
    .iter()
    .map(|t| tags::encode(t).unwrap())
    .collect();
    let refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let dict: &[&[u8]] = &[
        &[0x30, 0x80],
        &[0x0c, 0x7f],
        &[0x30, 0x82, 0xff, 0xff],
        b"=",
        b"$",
    ];
    segmesh_testkit::fuzz::run("tags-extension", &refs, dict, |input| {
        if let Ok(t) = tags::decode(input) {
            let again = tags::encode(&t).expect("decoded tags encode");
            assert_eq!(tags::decode(&again).expect("re-decode"), t);
        }
    });
}
