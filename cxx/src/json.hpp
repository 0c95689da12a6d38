// Tiny JSON writer: enough for the driver's output (objects, arrays, numbers with
// full double precision, strings, booleans, null).
#ifndef SHALLOW_ENSEMBLE_JSON_HPP
#define SHALLOW_ENSEMBLE_JSON_HPP

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace shallow_ensemble {

class Json {
public:
    Json(): kind_(Kind::Null) {}
    Json(double value): kind_(Kind::Number), number_(value) {}
    Json(int64_t value): kind_(Kind::Integer), integer_(value) {}
    Json(int value): Json(static_cast<int64_t>(value)) {}
    Json(bool value): kind_(Kind::Bool), boolean_(value) {}
    Json(std::string value): kind_(Kind::String), string_(std::move(value)) {}
    Json(const char* value): Json(std::string(value)) {}
    Json(std::vector<double> values);
    Json(std::vector<int64_t> values);

    static Json array() { Json json; json.kind_ = Kind::Array; return json; }
    static Json object() { Json json; json.kind_ = Kind::Object; return json; }

    /// append to an array
    Json& push(Json value);
    /// set a member of an object (keeps insertion order)
    Json& set(const std::string& key, Json value);

    std::string dump(int indent = 2) const;

private:
    enum class Kind { Null, Number, Integer, Bool, String, Array, Object };
    void write(std::string& out, int indent, int depth) const;

    Kind kind_;
    double number_ = 0.0;
    int64_t integer_ = 0;
    bool boolean_ = false;
    std::string string_;
    std::vector<Json> items_;
    std::vector<std::pair<std::string, Json>> members_;
};

}  // namespace shallow_ensemble

#endif
