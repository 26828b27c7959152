// test_checkpoint.h - just enough JSON and safetensors reading for tests
// that load the repo's checkpoints through the C ABI without the Go loader.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace dimoo::test {

struct StTensor {
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> data;
};

struct Json { // just enough JSON for safetensors headers and config.json
    std::string s;
    size_t i = 0;
    void ws() {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    }
    std::string str() {
        ws();
        std::string o;
        i++; // "
        while (s[i] != '"') {
            if (s[i] == '\\') i++;
            o += s[i++];
        }
        i++;
        return o;
    }
    double num() {
        ws();
        size_t n = 0;
        double v = std::stod(s.substr(i, 40), &n);
        i += n;
        return v;
    }
    void skip() { // any value
        ws();
        if (s[i] == '"') str();
        else if (s[i] == '{') obj([&](const std::string &) { skip(); });
        else if (s[i] == '[') arr([&] { skip(); });
        else while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']') i++;
    }
    template <class F> void obj(F f) {
        ws();
        i++; // {
        ws();
        if (s[i] == '}') {
            i++;
            return;
        }
        for (;;) {
            std::string k = str();
            ws();
            i++; // :
            f(k);
            ws();
            if (s[i++] == '}') return;
        }
    }
    template <class F> void arr(F f) {
        ws();
        i++; // [
        ws();
        if (s[i] == ']') {
            i++;
            return;
        }
        for (;;) {
            f();
            ws();
            if (s[i++] == ']') return;
        }
    }
};

inline bool read_file(const std::string &path, std::string &out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    out.assign(std::istreambuf_iterator<char>(f), {});
    return true;
}

inline bool read_safetensors(const std::string &path, std::map<std::string, StTensor> &out) {
    std::string raw;
    if (!read_file(path, raw) || raw.size() < 8) return false;
    uint64_t hl = 0;
    std::memcpy(&hl, raw.data(), 8);
    Json j{raw.substr(8, hl)};
    const size_t base = 8 + hl;
    j.obj([&](const std::string &name) {
        if (name == "__metadata__") {
            j.skip();
            return;
        }
        StTensor t;
        size_t b = 0, e = 0;
        j.obj([&](const std::string &k) {
            if (k == "dtype") t.dtype = j.str();
            else if (k == "shape") j.arr([&] { t.shape.push_back(int64_t(j.num())); });
            else if (k == "data_offsets") {
                int n = 0;
                j.arr([&] { (n++ == 0 ? b : e) = size_t(j.num()); });
            } else j.skip();
        });
        t.data.assign(raw.begin() + long(base + b), raw.begin() + long(base + e));
        out[name] = std::move(t);
    });
    return true;
}

} // namespace dimoo::test
