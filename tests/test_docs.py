"""The reference pages in docs/ are generated from the code and must be current."""

from labvault import docgen


def test_generated_docs_are_current():
    assert docgen.main(["--check"]) == 0, "run: python -m labvault.docgen"


def test_every_rule_is_documented():
    from labvault.policies.rules import RULES

    text = docgen.policy_rules_md()
    for name in RULES:
        assert f"`{name}`" in text
