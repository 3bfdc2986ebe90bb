"""Signal math: pure tensor functions that turn an adapter's captures into the scores reducers read.

Adapters capture (q/k projections, sub-block inputs and outputs); the formulas of the papers live
here, so an adapter never carries a method's equations: `attention` (attention received from a set
of query rows, causal, on a side path), `transition` (TransPrune's token transition variation),
`modality` (ToDRE's cross-modal attention mass), `pagerank` (AIM's PageRank token importance).
"""
