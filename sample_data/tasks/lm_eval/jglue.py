"""Document processing for the JGLUE task YAMLs in this folder (as lm-eval's own)."""


def process_jcommonsenseqa(dataset):
    """The five options choice0..choice4 as one `choices` list."""
    return dataset.map(lambda doc: {"choices": [doc[f"choice{i}"] for i in range(5)]})
