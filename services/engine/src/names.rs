//! Docker-style container names: `adjective_surname`, e.g. `quirky_lovelace`.
//!
//! The word lists are berth's own. As in Docker, a name that is taken is retried, and after the
//! first retry a random digit is appended, so generation always terminates quickly even when
//! many containers exist.

use rand::Rng;

/// Adjectives for the left part.
const LEFT: &[&str] = &[
    "admiring",
    "adoring",
    "agile",
    "amazing",
    "ample",
    "amused",
    "ardent",
    "awesome",
    "blissful",
    "bold",
    "brave",
    "breezy",
    "bright",
    "busy",
    "calm",
    "candid",
    "careful",
    "charming",
    "cheerful",
    "clever",
    "cool",
    "cosmic",
    "crisp",
    "curious",
    "dapper",
    "daring",
    "dazzling",
    "deft",
    "determined",
    "diligent",
    "dreamy",
    "eager",
    "earnest",
    "ecstatic",
    "elastic",
    "elegant",
    "eloquent",
    "epic",
    "exciting",
    "fervent",
    "festive",
    "fluffy",
    "focused",
    "fond",
    "friendly",
    "frosty",
    "funny",
    "gallant",
    "gentle",
    "gifted",
    "glad",
    "gleaming",
    "golden",
    "goofy",
    "gracious",
    "happy",
    "hardy",
    "hopeful",
    "humble",
    "hungry",
    "inspiring",
    "intrepid",
    "jolly",
    "jovial",
    "keen",
    "kind",
    "laughing",
    "lively",
    "loving",
    "lucid",
    "lucky",
    "magical",
    "merry",
    "mellow",
    "modest",
    "musing",
    "mystic",
    "nervous",
    "nifty",
    "nimble",
    "noble",
    "nostalgic",
    "optimistic",
    "patient",
    "peaceful",
    "pensive",
    "placid",
    "playful",
    "plucky",
    "polite",
    "practical",
    "priceless",
    "proud",
    "quirky",
    "quiet",
    "radiant",
    "rapid",
    "relaxed",
    "resolute",
    "romantic",
    "rustic",
    "serene",
    "sharp",
    "shiny",
    "silly",
    "sleepy",
    "smart",
    "snappy",
    "solid",
    "sparkling",
    "speedy",
    "spirited",
    "stoic",
    "sturdy",
    "sunny",
    "swift",
    "tender",
    "thirsty",
    "tidy",
    "trusting",
    "upbeat",
    "vibrant",
    "vigilant",
    "vigorous",
    "wise",
    "witty",
    "wizardly",
    "wonderful",
    "youthful",
    "zealous",
    "zen",
];

/// Surnames of scientists, engineers and mathematicians for the right part.
const RIGHT: &[&str] = &[
    "agnesi",
    "albattani",
    "allen",
    "almeida",
    "archimedes",
    "ardinghelli",
    "babbage",
    "banach",
    "bardeen",
    "bartik",
    "bassi",
    "bell",
    "bhabha",
    "blackwell",
    "bohr",
    "booth",
    "borg",
    "bose",
    "boyd",
    "brahmagupta",
    "brattain",
    "brown",
    "burnell",
    "cannon",
    "carson",
    "cartwright",
    "cerf",
    "chandrasekhar",
    "chaplygin",
    "chatelet",
    "chebyshev",
    "clarke",
    "colden",
    "cori",
    "cray",
    "curie",
    "darwin",
    "davinci",
    "dijkstra",
    "dirac",
    "driscoll",
    "dubinsky",
    "easley",
    "einstein",
    "elbakyan",
    "elgamal",
    "elion",
    "engelbart",
    "euclid",
    "euler",
    "faraday",
    "fermat",
    "fermi",
    "feynman",
    "franklin",
    "gagarin",
    "galileo",
    "galois",
    "gauss",
    "germain",
    "goldberg",
    "goldstine",
    "goodall",
    "gould",
    "grothendieck",
    "hamilton",
    "hawking",
    "heisenberg",
    "hermann",
    "herschel",
    "hertz",
    "hodgkin",
    "hofstadter",
    "hollerith",
    "hopper",
    "hoover",
    "hypatia",
    "jackson",
    "jang",
    "jemison",
    "jennings",
    "johnson",
    "joliot",
    "kalam",
    "kapitsa",
    "kare",
    "keldysh",
    "keller",
    "kepler",
    "khorana",
    "kilby",
    "knuth",
    "kowalevski",
    "lalande",
    "lamarr",
    "lamport",
    "leakey",
    "leavitt",
    "lederberg",
    "lehmann",
    "lewin",
    "liskov",
    "lovelace",
    "lumiere",
    "mahavira",
    "margulis",
    "matsumoto",
    "maxwell",
    "mayer",
    "mccarthy",
    "mcclintock",
    "meitner",
    "mendel",
    "mendeleev",
    "merkle",
    "minsky",
    "mirzakhani",
    "moore",
    "morse",
    "napier",
    "nash",
    "newton",
    "nightingale",
    "nobel",
    "noether",
    "northcutt",
    "noyce",
    "panini",
    "pascal",
    "pasteur",
    "payne",
    "perlman",
    "pike",
    "poincare",
    "poitras",
    "ptolemy",
    "raman",
    "ramanujan",
    "rhodes",
    "ride",
    "ritchie",
    "robinson",
    "rosalind",
    "rubin",
    "saha",
    "sammet",
    "sanderson",
    "satoshi",
    "shamir",
    "shannon",
    "shaw",
    "shirley",
    "shockley",
    "sinoussi",
    "snyder",
    "solomon",
    "spence",
    "stonebraker",
    "sutherland",
    "swanson",
    "swartz",
    "tesla",
    "thompson",
    "torvalds",
    "turing",
    "varahamihira",
    "vaughan",
    "villani",
    "visvesvaraya",
    "volhard",
    "wescoff",
    "wiles",
    "williams",
    "wilson",
    "wing",
    "wozniak",
    "wright",
    "wu",
    "yalow",
    "yonath",
    "zhukovsky",
];

/// One random name. With `retry > 0` a random digit is appended, as Docker does, so that a
/// busy name space still yields a free name within a few tries.
pub fn random_name(retry: u32) -> String {
    let mut rng = rand::rng();
    loop {
        let left = LEFT[rng.random_range(0..LEFT.len())];
        let right = RIGHT[rng.random_range(0..RIGHT.len())];
        // Steve Wozniak is not boring (Docker's one exception, kept for the same reason).
        if left == "boring" && right == "wozniak" {
            continue;
        }
        let mut name = format!("{left}_{right}");
        if retry > 0 {
            name.push(char::from(b'0' + rng.random_range(0..10u8)));
        }
        return name;
    }
}

/// A random name for which `taken` is false.
pub fn unique_name(mut taken: impl FnMut(&str) -> bool) -> String {
    let mut retry = 0;
    loop {
        let name = random_name(retry);
        if !taken(&name) {
            return name;
        }
        retry = retry.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_adjective_underscore_surname_and_valid() {
        for _ in 0..200 {
            let name = random_name(0);
            let (l, r) = name.split_once('_').unwrap();
            assert!(LEFT.contains(&l), "{name}");
            assert!(RIGHT.contains(&r), "{name}");
            berth_core::id::validate_name(&name).unwrap();
        }
    }

    #[test]
    fn retries_append_a_digit() {
        let name = random_name(1);
        assert!(name.chars().last().unwrap().is_ascii_digit(), "{name}");
        berth_core::id::validate_name(&name).unwrap();
    }

    #[test]
    fn unique_names_avoid_taken_ones() {
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let name = unique_name(|n| seen.contains(n));
            assert!(seen.insert(name));
        }
        // Everything without a digit taken: still terminates.
        let name = unique_name(|n| !n.chars().last().unwrap().is_ascii_digit());
        assert!(name.chars().last().unwrap().is_ascii_digit());
    }

    #[test]
    fn lists_have_no_duplicates_and_are_lowercase() {
        for list in [LEFT, RIGHT] {
            let set: HashSet<_> = list.iter().collect();
            assert_eq!(set.len(), list.len());
            assert!(
                list.iter()
                    .all(|w| w.bytes().all(|b| b.is_ascii_lowercase()))
            );
        }
    }
}
