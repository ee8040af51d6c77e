//! Multi-stage resolution, as the classic builder does it.
//!
//! The classic builder builds **every stage up to and including the target**, in order, whether
//! the target uses them or not (BuildKit skips unused stages; the classic builder does not):
//! [`stages_to_build`] says so. `FROM <name>` refers to an earlier stage by name only;
//! `COPY --from=` takes an earlier stage's name, then a stage index, then an image reference
//! (moby's `stagesBuildResults.get`).

use crate::dockerfile::Dockerfile;

/// Errors of stage resolution, worded as moby's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("failed to reach build target {0} in Dockerfile")]
    UnknownTarget(String),
    #[error("invalid stage index {0}")]
    InvalidIndex(i64),
}

/// The index of the stage `--target` names (case-insensitive), or the last stage.
pub fn target_index(dockerfile: &Dockerfile, target: Option<&str>) -> Result<usize, StageError> {
    match target.filter(|t| !t.is_empty()) {
        None => Ok(dockerfile.stages.len().saturating_sub(1)),
        Some(target) => dockerfile
            .stages
            .iter()
            .position(|s| {
                s.name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(target))
            })
            .ok_or_else(|| StageError::UnknownTarget(target.to_string())),
    }
}

/// The stages the classic builder runs for a target: all of `0..=target`, in order.
pub fn stages_to_build(
    dockerfile: &Dockerfile,
    target: Option<&str>,
) -> Result<std::ops::RangeInclusive<usize>, StageError> {
    Ok(0..=target_index(dockerfile, target)?)
}

/// What a FROM or `COPY --from` refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageRef {
    /// An earlier stage of this build, by index.
    Stage(usize),
    /// An image reference (or `scratch` for FROM).
    Image(String),
}

/// Resolves an (expanded) FROM base for stage `current`: an earlier stage's name, else an image.
pub fn resolve_from(dockerfile: &Dockerfile, current: usize, base: &str) -> StageRef {
    earlier_by_name(dockerfile, current, base)
        .map_or_else(|| StageRef::Image(base.to_string()), StageRef::Stage)
}

/// Resolves `COPY --from=<value>` in stage `current`: an earlier stage's name, then a number
/// (which must be an earlier stage's index), else an image reference.
pub fn resolve_copy_from(
    dockerfile: &Dockerfile,
    current: usize,
    from: &str,
) -> Result<StageRef, StageError> {
    if let Some(index) = earlier_by_name(dockerfile, current, from) {
        return Ok(StageRef::Stage(index));
    }
    match from.parse::<i64>() {
        Ok(index) if index >= 0 && (index as usize) < current => {
            Ok(StageRef::Stage(index as usize))
        }
        Ok(index) => Err(StageError::InvalidIndex(index)),
        Err(_) => Ok(StageRef::Image(from.to_string())),
    }
}

fn earlier_by_name(dockerfile: &Dockerfile, current: usize, name: &str) -> Option<usize> {
    dockerfile.stages[..current.min(dockerfile.stages.len())]
        .iter()
        .rposition(|s| {
            s.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::parse;

    const MULTI: &str = "FROM busybox AS Base\nFROM base AS build\nFROM alpine\nFROM scratch AS final\nCOPY --from=build /a /a\n";

    #[test]
    fn targets() {
        let df = parse(MULTI).unwrap();
        assert_eq!(target_index(&df, None).unwrap(), 3);
        assert_eq!(target_index(&df, Some("")).unwrap(), 3);
        assert_eq!(target_index(&df, Some("BUILD")).unwrap(), 1);
        assert_eq!(stages_to_build(&df, Some("build")).unwrap(), 0..=1);
        assert_eq!(
            target_index(&df, Some("nope")).unwrap_err().to_string(),
            "failed to reach build target nope in Dockerfile"
        );
    }

    #[test]
    fn from_refers_to_earlier_stages_by_name() {
        let df = parse(MULTI).unwrap();
        assert_eq!(resolve_from(&df, 1, "base"), StageRef::Stage(0));
        assert_eq!(resolve_from(&df, 1, "BASE"), StageRef::Stage(0));
        assert_eq!(
            resolve_from(&df, 0, "busybox"),
            StageRef::Image("busybox".into())
        );
        // A stage cannot use itself or a later stage; an index is not a stage for FROM.
        assert_eq!(
            resolve_from(&df, 1, "build"),
            StageRef::Image("build".into())
        );
        assert_eq!(resolve_from(&df, 2, "0"), StageRef::Image("0".into()));
    }

    #[test]
    fn copy_from_name_index_or_image() {
        let df = parse(MULTI).unwrap();
        assert_eq!(
            resolve_copy_from(&df, 3, "build").unwrap(),
            StageRef::Stage(1)
        );
        assert_eq!(resolve_copy_from(&df, 3, "2").unwrap(), StageRef::Stage(2));
        assert_eq!(
            resolve_copy_from(&df, 3, "busybox:1.36").unwrap(),
            StageRef::Image("busybox:1.36".into())
        );
        assert_eq!(
            resolve_copy_from(&df, 3, "3").unwrap_err().to_string(),
            "invalid stage index 3"
        );
        assert_eq!(
            resolve_copy_from(&df, 1, "-1").unwrap_err().to_string(),
            "invalid stage index -1"
        );
    }
}
