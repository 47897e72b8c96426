# nnguard — see README.md. `make test` is what CI runs (through .ci/run).
GO        ?= go
PYTHON    ?= python3
BIN       := bin/nnguard
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
PKGS      := ./...

.PHONY: all build test test-go test-sim demo bench fmt vet lint check-modules coverage fuzz clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/nnguard

test: test-go test-sim

test-go:
	$(GO) test -race -timeout 20m $(PKGS)

test-sim:
	$(PYTHON) -m unittest discover -s sim -p 'test_*.py'

demo: build
	./scripts/demo.sh

bench: build
	./scripts/bench.sh

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet $(PKGS)

lint: vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

check-modules:
	$(GO) mod tidy
	git diff --exit-code go.mod go.sum

coverage:
	$(GO) test -coverprofile=coverage.out $(PKGS)
	$(GO) tool cover -func=coverage.out | tail -1

fuzz:
	$(GO) test ./logparse -run '^$$' -fuzz FuzzSplitter -fuzztime 30s
	$(GO) test ./logparse -run '^$$' -fuzz FuzzClassify -fuzztime 30s
	$(GO) test ./nnunet -run '^$$' -fuzz FuzzInspect -fuzztime 30s

clean:
	rm -rf bin coverage.out
